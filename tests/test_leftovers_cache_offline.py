"""What a killed run leaves behind, the permissions of saved files, the dequantized-GGUF cache (manifest,
rebuild when damaged), and failing in seconds when the hub cannot be reached. The network is mocked:
nothing here depends on whether this machine is online."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import logits, tiny_llama, windows
from safetensors.torch import save_file

from lmcompose.core import hub, io
from lmcompose.core.io import (
    atomic_file,
    check_manifest,
    remove_stale_temporaries,
    write_manifest,
)
from lmcompose.data import text
from lmcompose.data.text import load_documents
from lmcompose.models import load as load_mod
from lmcompose.models.checkpoint import save_compressed
from lmcompose.models.load import load_model, model_config, resolve_model


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


# -- leftovers ------------------------------------------------------------------------------------------
KILLED_WRITER = """
import os, signal, sys
from lmcompose.core.io import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "model.safetensors").write_bytes(b"x" * 4096)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_save_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    out = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)])
    assert proc.wait() == -signal.SIGKILL
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith(f".ck.tmp-{proc.pid}@")  # named after its writer
    assert not out.exists()
    save_compressed(tiny_llama(), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_only_temporaries_of_writers_that_are_gone_are_removed(tmp_path):
    target = tmp_path / "run"
    gone, alive, host = dead_pid(), os.getppid(), io._host()
    paths = {name: tmp_path / name for name in
             [f".run.tmp-{gone}@{host}-abc", f".run.tmp-{alive}@{host}-abc", f".run.tmp-{os.getpid()}@{host}-abc",
              f".run.old-{gone}@{host}", f".run.tmp-{gone}@elsewhere-abc", f".run.tmp-{gone}-abc",
              ".run.tmp-legacy1", ".run.tmp-legacy2", f".other.tmp-{gone}@{host}-abc",
              f".run.json.tmp-{gone}@{host}-x.json"]}
    for name, p in paths.items():
        if name.endswith(".json"):
            p.write_text("{}")
        else:
            p.mkdir()
            (p / "model.safetensors").write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    for p in (paths[".run.tmp-legacy2"], paths[".run.tmp-legacy2"] / "model.safetensors"):
        os.utime(p, (two_hours_ago, two_hours_ago))  # written before pids were recorded, long ago
    removed = {p.name for p in remove_stale_temporaries(target)}
    # a dead writer of this host (also named without the host), and an unnamed writer's after an hour; kept:
    # a live writer, this process, an unnamed writer's of a minute ago, another host's (whose pids mean nothing)
    assert removed == {f".run.tmp-{gone}@{host}-abc", f".run.old-{gone}@{host}", f".run.tmp-{gone}-abc",
                       ".run.tmp-legacy2"}
    assert {p.name for p in remove_stale_temporaries(tmp_path / "run.json")} == {f".run.json.tmp-{gone}@{host}-x.json"}
    assert paths[f".other.tmp-{gone}@{host}-abc"].exists()  # another target's: not touched
    old_time = time.time() - 7200
    os.utime(paths[f".run.tmp-{gone}@elsewhere-abc"], (old_time, old_time))
    os.utime(paths[f".run.tmp-{gone}@elsewhere-abc"] / "model.safetensors", (old_time, old_time))
    assert {p.name for p in remove_stale_temporaries(target)} == {f".run.tmp-{gone}@elsewhere-abc"}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_get_the_permissions_of_the_umask(tmp_path, tiny_tokenizer, umask):
    old = os.umask(umask)
    try:
        out = save_compressed(tiny_llama(), tmp_path / "ck", tiny_tokenizer)
        with atomic_file(tmp_path / "report.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [*out.iterdir(), tmp_path / "report.json"]}
    assert "model.safetensors" in modes and set(modes.values()) == {oct(0o666 & ~umask)}, modes


# -- manifests and the dequantized-GGUF cache -----------------------------------------------------------
def flip(path, at=1000):
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_manifest_catches_a_changed_file_and_keeps_up_with_copies(tmp_path):
    (tmp_path / "a.bin").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "config.json").write_text("{}")
    write_manifest(tmp_path)
    assert check_manifest(tmp_path) is None
    st = (tmp_path / "a.bin").stat()
    flip(tmp_path / "a.bin")
    os.utime(tmp_path / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert check_manifest(tmp_path, "sizes") is None
    assert check_manifest(tmp_path) == "a.bin does not match its recorded sha256"
    os.utime(tmp_path / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns))  # damage that kept the time
    assert check_manifest(tmp_path) is None and "sha256" in check_manifest(tmp_path, "all")
    flip(tmp_path / "a.bin")  # restored; a copy (new time, same bytes) is accepted and its time recorded
    os.utime(tmp_path / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    assert check_manifest(tmp_path) is None
    assert json.loads((tmp_path / "lmcompose-manifest.json").read_text())["files"]["a.bin"]["mtime_ns"] == \
        st.st_mtime_ns + 5 * 10**9
    (tmp_path / "a.bin").write_bytes(b"short")
    assert "has 5 bytes" in check_manifest(tmp_path, "sizes")
    (tmp_path / "a.bin").unlink()
    assert check_manifest(tmp_path) == "a.bin is missing"


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tiny_tokenizer):
    """A .gguf file whose 'dequantization' (transformers' GGUF reader, mocked) gives a tiny Llama; returns
    (gguf path, cache root, reference model, dequantization calls)."""
    import transformers

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    reference, calls = tiny_llama(), []
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def model_from(path, *a, gguf_file=None, **kw):
        if gguf_file is None:
            return real_model(path, *a, **kw)
        calls.append(gguf_file)
        return tiny_llama()

    def tok_from(path, *a, gguf_file=None, **kw):
        return tiny_tokenizer if gguf_file is not None else real_tok(path, *a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok_from)
    return gguf, tmp_path / "cache", reference, calls


def cached_copy(gguf, cache):
    return load_mod._gguf_cache_dir(resolve_model(str(gguf)), cache)


def test_the_cache_is_written_once_with_a_manifest(fake_gguf):
    gguf, cache, reference, calls = fake_gguf
    model, _ = load_model(str(gguf), cache_dir=cache)
    model, _ = load_model(str(gguf), cache_dir=cache)
    assert len(calls) == 1 and torch.equal(logits(model, windows()), logits(reference, windows()))
    target = cached_copy(gguf, cache)
    assert check_manifest(target, "all") is None
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temporaries left


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "config deleted", "manifest garbled"])
def test_a_damaged_cache_is_rebuilt_with_a_log_line(fake_gguf, damage, caplog):
    gguf, cache, reference, calls = fake_gguf
    load_model(str(gguf), cache_dir=cache)
    weights = cached_copy(gguf, cache) / "model.safetensors"
    if damage == "flipped byte":
        st = weights.stat()
        flip(weights, at=weights.stat().st_size - 100)
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif damage == "config deleted":
        (weights.parent / "config.json").unlink()
    else:
        (weights.parent / "lmcompose-manifest.json").write_text("[")
    with caplog.at_level(logging.WARNING, logger="lmcompose.models.load"):
        model, _ = load_model(str(gguf), cache_dir=cache)
    assert len(calls) == 2 and "is damaged" in caplog.text and "rebuilding" in caplog.text
    assert torch.equal(logits(model, windows()), logits(reference, windows()))
    assert check_manifest(weights.parent, "all") is None


def test_a_cache_written_before_manifests_is_adopted_when_whole_and_rebuilt_when_not(fake_gguf):
    gguf, cache, _, calls = fake_gguf
    load_model(str(gguf), cache_dir=cache)
    target = cached_copy(gguf, cache)
    (target / "lmcompose-manifest.json").unlink()
    load_model(str(gguf), cache_dir=cache)
    assert len(calls) == 1 and check_manifest(target, "all") is None  # adopted: manifest recorded now
    (target / "lmcompose-manifest.json").unlink()
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    load_model(str(gguf), cache_dir=cache)
    assert len(calls) == 2 and check_manifest(target, "all") is None


def test_a_killed_cache_write_is_cleaned_up_by_the_next_load(fake_gguf):
    gguf, cache, _, calls = fake_gguf
    target = cached_copy(gguf, cache)
    left = target.with_name(f".{target.name}.tmp-{dead_pid()}@{io._host()}-k1ll")
    left.mkdir(parents=True)
    save_file({"w": torch.zeros(10)}, str(left / "model.safetensors"))
    load_model(str(gguf), cache_dir=cache)
    assert not left.exists() and target.is_dir()
    left.mkdir()  # also when the cache already exists (the load then writes nothing)
    os.utime(left, (time.time() - 7200,) * 2)
    left.rename(left.with_name(f".{target.name}.tmp-{dead_pid()}@{io._host()}-k2"))
    load_model(str(gguf), cache_dir=cache)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    assert len(calls) == 1


def test_a_damaged_cached_config_is_read_again(fake_gguf, monkeypatch):
    import transformers

    gguf, cache, _, _ = fake_gguf
    real = transformers.AutoConfig.from_pretrained
    reads = []

    def config_from(path, *a, gguf_file=None, **kw):
        if gguf_file is None:
            return real(path, *a, **kw)
        reads.append(path)
        return tiny_llama().config

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config_from)
    assert model_config(str(gguf), cache_dir=cache).num_hidden_layers == 2
    config_dir = cached_copy(gguf, cache).with_name(cached_copy(gguf, cache).name + ".config")
    (config_dir / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 7,')
    assert model_config(str(gguf), cache_dir=cache).num_hidden_layers == 2 and len(reads) == 2
    assert check_manifest(config_dir, "all") is None


# -- offline --------------------------------------------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    """The hub's host does not resolve (as on a machine without network), and no offline variable is set."""
    def refuse(address, timeout=None):
        raise OSError(-2, "Name or service not known")

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LMCOMPOSE_DATA_DIR", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub.socket, "create_connection", refuse)
    hub.reset()
    yield
    hub.reset()


def test_a_hub_model_fails_in_seconds_when_the_hub_is_unreachable(no_network, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        load_model("someone/some-model", cache_dir=tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="someone/some-model"):
        model_config("someone/some-model")
    assert time.perf_counter() - t0 < 10
    message = str(err.value)
    for part in ("'someone/some-model' is not in the local Hugging Face cache", "cannot be reached",
                 "hf download someone/some-model", "--model DIR", "smollm2-135m"):
        assert part in message, message


def test_a_missing_data_file_fails_in_seconds_naming_it(no_network, tmp_path, monkeypatch):
    monkeypatch.setenv("LMCOMPOSE_DATA_DIR", str(tmp_path))
    # with no network, the data shipped with lmcompose answers (test_packaged_data.py) ...
    assert load_documents("wikitext2", "test")[0] == " = Robert Boulter = \n"
    monkeypatch.setattr(text, "PACKAGED", {})  # ... and without it, the error
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        load_documents("wikitext2", "test")
    assert time.perf_counter() - t0 < 10
    message = str(err.value)
    for part in (str(tmp_path / "wikitext-2" / "wiki.test.raw"), "cannot be reached", "Name or service not known",
                 "--data-dir",
                 "LMCOMPOSE_DATA_DIR"):
        assert part in message, message


def test_the_probe_does_not_wait_for_a_hanging_resolver(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    def hang(*args, **kwargs):
        time.sleep(30)
        raise OSError("resolver gave up")  # long after the test; the daemon thread ends quietly

    monkeypatch.setattr(hub.socket, "create_connection", hang)
    monkeypatch.setattr(hub, "PROBE_TIMEOUT_S", 0.2)
    hub.reset()
    t0 = time.perf_counter()
    try:
        assert "no answer within 0.2 s" in hub.hub_unreachable()
        assert time.perf_counter() - t0 < 2
    finally:
        hub.reset()


def test_hf_hub_offline_is_honoured_without_probing(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_probe", lambda: pytest.fail("probed although HF_HUB_OFFLINE is set"))
    assert hub.hub_unreachable() == "HF_HUB_OFFLINE is set"


def test_an_explicit_data_dir_that_lacks_the_file_is_an_error_not_a_download(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(text, "hub_unreachable", lambda: None)  # online
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("went to the hub"))
    with pytest.raises(FileNotFoundError) as err:
        load_documents("c4", "validation", tmp_path)
    assert str(tmp_path / "c4" / "c4_validation_2k.parquet") in str(err.value) and "--data-dir" in str(err.value)


def test_a_data_dir_from_the_environment_falls_back_to_the_hub_when_online(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("LMCOMPOSE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(text, "hub_unreachable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: {"text": ["from the hub"]})
    assert load_documents("wikitext2", "validation") == ["from the hub"]  # not shipped with lmcompose
    assert load_documents("wikitext2", "test")[0] != "from the hub"  # shipped: the packaged copy comes first
    monkeypatch.setattr(text, "PACKAGED", {})
    assert load_documents("wikitext2", "test") == ["from the hub"]
