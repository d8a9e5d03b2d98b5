"""The command-line entry points fail on bad input with one line and a non-zero exit."""

import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def _one_error_line(result):
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()  # progress lines (a first GGUF conversion) may come before
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0]
    return errors[0]


def test_predict_unknown_model():
    line = _one_error_line(_run("jaxedit.predict", "--model", "no-such-model"))
    assert "gemma-3-270m" in line  # names what is known


def test_localize_refuses_an_existing_output_directory(tmp_path):
    line = _one_error_line(_run("jaxedit.localize", "--out", str(tmp_path)))
    assert "already exists" in line


def test_localize_bad_facts_file(tmp_path):
    bad = tmp_path / "facts.csv"
    bad.write_text("name,team\nA,B\n")
    line = _one_error_line(_run("jaxedit.localize", "--model", "smollm2-135m", "--facts", str(bad),
                                "--out", str(tmp_path / "out")))
    assert "missing column" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_sweep_help_lists_every_config_key_with_its_default():
    import dataclasses
    import typing

    from jaxedit.sweep.config import SweepConfig

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[field.name]):
                yield from walk(hints[field.name], f"{prefix}{field.name}.")
            else:
                yield prefix + field.name, field.default

    result = _run("jaxedit.sweep", "--help")
    assert result.returncode == 0
    listed = {line.split()[0]: line.split(None, 1)[1] for line in result.stdout.splitlines()
              if line.startswith("  ") and len(line.split()) >= 2}
    keys = dict(walk(SweepConfig))
    assert len(keys) > 50 and set(keys) <= set(listed)
    assert listed["train.lr"] == "1.0e-05" and listed["relearn.eval_at"] == "[0, 10, 20]"
    assert listed["train.preset"] == "null" and listed["soft_prompt.enabled"] == "true"


def test_sweep_unwritable_output_is_one_error_line(tiny_llama_dir):
    result = _run("jaxedit.sweep", f"models=[{tiny_llama_dir}]", "localizations=[random]", "train.preset=null",
                  "output=/proc/none/x")
    line = _one_error_line(result)
    assert "cannot create the run directory /proc/none/x" in line and "Traceback" not in result.stderr
