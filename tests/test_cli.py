"""The `mistral` command, run as users run it: output, exit codes, one-line errors."""

import json
import shutil
import subprocess
import sys

import pytest

from mistral.contract import BACKENDS
from tests.helpers import ROOT, V1, mistral_common_file

DEFAULT = ROOT / "mistral" / "default_model"


def run(
    *args: str, stdin: str | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mistral", *args],
        input=stdin,
        text=True,
        capture_output=True,
        cwd=ROOT,
        env=env,
        timeout=300,
        check=False,
    )


def assert_one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("command", ["generate", "chat", "info", "convert", "diff", "bench"])
def test_help_explains_every_command(command):
    """Every option has its text, and an option with a value to default to says it (a flag's
    default, off, goes without saying since the help says what the flag does)."""
    import re

    out = run(command, "--help")
    assert out.returncode == 0 and "usage: mistral " + command in out.stdout
    options = re.findall(r"^  (--[\w-]+)( [A-Z{][^ ]*)?( +\S.*)?$", out.stdout, re.M)
    assert options and all(text or value for _, value, text in options), options
    if command in ("generate", "chat", "bench"):
        assert "(default:" in out.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_on_the_default_model(backend):
    out = run(
        "generate", "--prompt", "And it came to pass", "--max-tokens", "40", "--backend", backend
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("And it came to pass")
    assert len(out.stdout.split()) > 15
    assert "prompt:" in out.stderr and "tok/s" in out.stderr


def test_generate_reads_stdin_and_batches():
    piped = run("generate", "--max-tokens", "10", stdin="In the beginning\n")
    assert piped.returncode == 0 and piped.stdout.startswith("In the beginning")
    batch = run(
        "generate", "--prompt", "Jesus wept.", "--prompt", "Let there be", "--max-tokens", "8"
    )
    assert (
        batch.returncode == 0 and "Jesus wept." in batch.stdout and "Let there be" in batch.stdout
    )


def test_sampling_is_repeatable_with_a_seed():
    a = run(
        "generate", "--prompt", "And", "--temperature", "0.8", "--seed", "3", "--max-tokens", "20"
    )
    b = run(
        "generate", "--prompt", "And", "--temperature", "0.8", "--seed", "3", "--max-tokens", "20"
    )
    assert a.returncode == 0 and a.stdout == b.stdout


def test_chat_keeps_going_over_turns():
    out = run("chat", "--max-tokens", "12", stdin="Who made the heaven?\nAnd the earth?\n")
    assert out.returncode == 0, out.stderr
    assert len([line for line in out.stdout.splitlines() if line.strip()]) >= 2


def test_info_text_and_json():
    out = run("info", str(DEFAULT))
    assert out.returncode == 0 and "mistral format" in out.stdout and "sliding window" in out.stdout
    info = json.loads(run("info", str(DEFAULT), "--json").stdout)
    assert info["format"] == "mistral" and info["parameters"] > 1_000_000
    assert info["tokenizer"]["chat_template"] == "v1"


def test_convert_then_generate_the_same_text(tmp_path):
    for fmt in ("hf", "mlx"):
        out = run("convert", str(DEFAULT), str(tmp_path / fmt), "--to", fmt)
        assert out.returncode == 0, out.stderr
    texts = [
        run("generate", "--model", str(m), "--prompt", "The LORD", "--max-tokens", "20").stdout
        for m in (DEFAULT, tmp_path / "hf", tmp_path / "mlx")
    ]
    assert texts[0] == texts[1] == texts[2] and texts[0]
    again = run("convert", str(DEFAULT), str(tmp_path / "hf"), "--to", "hf")
    assert_one_line_error(again, "not empty")


def test_diff_reports_agreement_with_json_and_plot(tmp_path):
    out = run(
        "diff",
        "--a",
        "torch:cpu:float32",
        "--b",
        "mlx:cpu:float32",
        "--prompt",
        "And God said",
        "--generate",
        "6",
        "--json",
        str(tmp_path / "r.json"),
        "--plot",
        str(tmp_path / "r.png"),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verdict: the two sides agree" in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["agree"] and report["generation"]["first_difference"] is None
    assert (tmp_path / "r.png").stat().st_size > 1000


@pytest.mark.parametrize("planted", [False, True])
def test_diff_verdict_and_exit_code_on_two_folders(tmp_path, planted):
    """--b-model: the embedded model against its Hugging Face conversion agrees (exit 0); with
    the conversion's rope_theta changed (a planted mistake) the sides disagree (exit 1), the note
    names the key and the first divergence is layer 0's q."""
    converted = tmp_path / "hf"
    assert run("convert", str(DEFAULT), str(converted), "--to", "hf").returncode == 0
    if planted:
        config = json.loads((converted / "config.json").read_text())
        config["rope_theta"] = config["rope_theta"] * 2
        (converted / "config.json").write_text(json.dumps(config))
    out = run(
        "diff",
        "--b-model",
        str(converted),
        "--a",
        "torch",
        "--b",
        "torch",
        "--tokens",
        "1,5,9,300,41,7,12",
    )
    if planted:
        assert out.returncode == 1, out.stdout + out.stderr
        assert "note: rope_theta is" in out.stdout
        assert "verdict: first divergence at layers.0.q" in out.stdout
    else:
        assert out.returncode == 0, out.stdout + out.stderr
        assert "verdict: the two sides agree" in out.stdout


def test_bench_runs_and_writes_json(tmp_path):
    out = run(
        "bench",
        "--config",
        "tiny-dense",
        "--prompt-len",
        "16",
        "--gen-len",
        "4",
        "--repeats",
        "1",
        "--json",
        str(tmp_path / "b.json"),
    )
    assert out.returncode == 0, out.stderr
    assert "decode tok/s" in out.stdout
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["decode_tok_s"]["median"] > 0


def test_bad_input_gets_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(
        run("generate", "--model", str(tmp_path / "empty"), "--prompt", "a"),
        "no known checkpoint format",
    )
    no_tok = tmp_path / "no_tok"
    shutil.copytree(DEFAULT, no_tok)
    (no_tok / "tokenizer.model").unlink()
    assert_one_line_error(run("generate", "--model", str(no_tok), "--prompt", "a"), "no tokenizer")
    big = run("generate", "--tokenizer", str(mistral_common_file(V1)), "--prompt", "a")
    assert_one_line_error(big, "32000 tokens but the model only 2048")
    assert_one_line_error(run("generate", "--device", "cuda", "--prompt", "a"), "not available")
    assert_one_line_error(
        run("generate", "--backend", "mlx", "--device", "tpu", "--prompt", "a"),
        "unknown MLX device",
    )
    assert_one_line_error(run("diff", "--tokens", "1,x"), "not a comma-separated list")
    assert_one_line_error(run("generate", "--prompt", "a", "--top-p", "0"), "top_p")
    broken = tmp_path / "broken"
    shutil.copytree(DEFAULT, broken)
    data = (broken / "consolidated.safetensors").read_bytes()
    (broken / "consolidated.safetensors").write_bytes(data[:1000])
    assert_one_line_error(run("info", str(broken)), "truncated")
    assert_one_line_error(run("bench", "--config", "nope"), "no config")
    assert_one_line_error(run("bench", "--warmup", "0"), "--warmup must be at least 1")
    assert_one_line_error(run("generate", "--backend", "jax"), "invalid choice: 'jax'")
    assert_one_line_error(run("generate", "--max-tokens", "many"), "invalid int value")


@pytest.mark.parametrize("command", ["generate", "chat", "info", "convert", "diff", "bench"])
def test_help_reads_as_written_by_hand(command):
    """No parser internals in the help: group names, type names as placeholders, --noflags,
    defaults of None, descriptions twice."""
    out = run(command, "--help").stdout
    for internal in ("['options", " list", "[str]", "[int]", " bool", "--no", "(default: None)"):
        assert internal not in out, (internal, out)
    description = COMMAND_DOCS[command]
    assert out.count(description) == 1


COMMAND_DOCS = {
    "generate": "Generate text from prompts",
    "chat": "Chat with an instruct model",
    "info": "Describe a model folder",
    "convert": "Convert a model folder",
    "diff": "Find where two backends",
    "bench": "Measure prefill and decode speed",
}


def test_version_and_errors_named_by_their_command():
    import mistral

    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"mistral {mistral.__version__}"
    unknown = run("generate", "--bogus")
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("mistral generate: error: unrecognized arguments: --bogus")
    missing = run("info")
    assert missing.returncode == 2 and "required: PATH" in missing.stderr
    assert "options." not in missing.stderr
    top = run("--help").stdout
    assert "optionally against transformers and mlx-lm on the same weights in the same run." in (
        " ".join(top.split())
    )  # the bench line is a whole sentence


def test_a_flag_takes_no_value_so_it_may_come_before_a_path():
    for argv in (["info", str(DEFAULT), "--json"], ["info", "--json", str(DEFAULT)]):
        out = run(*argv)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["format"] == "mistral"


def test_other_libraries_warnings_stay_out_and_ours_are_one_line():
    code = (
        "import warnings, sys\n"
        "from mistral.cli import quiet_third_parties\n"
        "quiet_third_parties()\n"
        "warnings.warn('`past_key_values` is deprecated', FutureWarning)\n"
        "warnings.warn('Torchinductor does not support code generation for complex operators')\n"
        "warnings.warn('params.json has no rope_theta: using 10000')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.stdout == ""
    assert out.stderr == "mistral: warning: params.json has no rope_theta: using 10000\n"


def test_chat_refuses_a_template_its_tokenizer_cannot_serve_at_start():
    out = run("chat", "--template", "v7", stdin="")  # no message needed to find out
    assert_one_line_error(out, "template v7 needs the control token")
    assert out.stdout == ""


def test_chat_commands_without_a_terminal(tmp_path):
    saved = tmp_path / "c.json"
    script = f"/set temperature 2x\n/set top_p 0\nWho was Noah?\n/save {saved}\n/quit\nignored\n"
    out = run("chat", "--max-tokens", "5", stdin=script)
    assert out.returncode == 0, out.stderr
    assert "temperature takes a number" in out.stderr and "top_p must be in (0, 1]" in out.stderr
    record = json.loads(saved.read_text())
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    again = run("chat", "--max-tokens", "5", stdin=f"/load {saved}\nAnd then?\n/save {saved}\n")
    assert again.returncode == 0, again.stderr
    assert len(json.loads(saved.read_text())["messages"]) == 4
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": "wizard", "content": "x"}]}')
    out = run("chat", stdin=f"/load {bad}\n")
    assert out.returncode == 0 and "mistral chat:" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "blocked, argv, needle",
    [
        ("transformers", ["diff", "--tokens", "1,2,3", "--b", "hf"], "'.[hf]'"),
        ("mlx_lm", ["diff", "--tokens", "1,2,3", "--a", "mlx", "--b", "mlx-lm"], "'.[mlx-lm]'"),
        ("huggingface_hub", ["info", "someone/not-a-folder"], "'.[hub]'"),
    ],
)
def test_a_missing_extra_is_named_in_one_line(blocked, argv, needle):
    block = f"import sys; sys.modules[{blocked!r}] = None"
    code = f"{block}; from mistral.cli import main; sys.exit(main())"
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert out.returncode == 1 and needle in out.stderr, out.stderr[-500:]
    assert len(out.stderr.strip().splitlines()) == 1
