"""Models by Hugging Face hub id, offline, from a hub cache built in a temporary folder.

The fast tests store tiny-llama (as a safetensors folder and as a GGUF) under hub ids and check that
`kvos run --model ORG/NAME` gives the built-in tiny-llama's greedy tokens; the slow one stores
SmolLM2-135M-Instruct as transformers saves it from its GGUF and compares with `smollm2-135m`.
"""
import json

import pytest

from tests.helpers import hub_cache
from tests.helpers.tiny_gguf import write_gguf
from userspace.programs import hub, tiny
from userspace.shell.main import main

PROMPTS = ["hello there", "what is paging?"]


@pytest.fixture
def hub_only(tmp_path, monkeypatch):
    """An empty hub cache, offline."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_resolved", {})
    return cache


@pytest.fixture
def offline_cache(hub_only, tmp_path, monkeypatch):
    """The same, and kvos's own cache (converted GGUFs, digests) beside it."""
    monkeypatch.setenv("KVOS_CACHE_DIR", str(tmp_path / "kvos-cache"))
    return hub_only


def run_tokens(capsys, *args) -> list:
    assert main(["run", "--json", "--max-tokens", "12", "--threads", "1", *args, *PROMPTS]) == 0, \
        capsys.readouterr().err
    return [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]


def test_hub_ids_are_told_from_paths_and_names(tmp_path, monkeypatch):
    assert hub.parse("HuggingFaceTB/SmolLM2-135M-Instruct") == hub.HubId("HuggingFaceTB/SmolLM2-135M-Instruct",
                                                                        None, None)
    assert hub.parse("org/name@v1.0:sub.Q4_K_M.gguf") == hub.HubId("org/name", "v1.0", "sub.Q4_K_M.gguf")
    for not_an_id in ("smollm2-135m", "tiny-llama", "/abs/model", "./rel/model", "~/m/x", "models/file.gguf",
                      "a/b/c", "org/na--me", "org/", "org/name:weights.bin"):
        assert hub.parse(not_an_id) is None, not_an_id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub.parse("org/name") is None                 # a folder that exists is a path
    assert hub.with_gguf_file("org/repo", "x.gguf") == "org/repo:x.gguf"


def test_run_by_hub_id_offline_gives_the_builtin_tokens(tmp_path, offline_cache, capsys):
    folder = hub_cache.write_tiny_folder(tmp_path / "tiny-hf")
    files = {p.name: p for p in folder.iterdir()}
    snapshot = hub_cache.put(offline_cache, "kvos-test/tiny-llama", files)
    assert hub_cache.check(offline_cache, "kvos-test/tiny-llama") == {snapshot.name}    # huggingface_hub's view
    builtin = run_tokens(capsys, "--model", "tiny-llama")
    assert run_tokens(capsys, "--model", "kvos-test/tiny-llama") == builtin
    assert hub.resolve("kvos-test/tiny-llama") == snapshot

    # @REVISION: a tag, and a commit hash, name another snapshot (other weights: other tokens)
    other = hub_cache.write_tiny_folder(tmp_path / "tiny-hf-seed1", seed=1)
    commit = hub_cache.put(offline_cache, "kvos-test/tiny-llama", {p.name: p for p in other.iterdir()},
                           revision="v2").name
    by_tag = run_tokens(capsys, "--model", "kvos-test/tiny-llama@v2")
    assert by_tag != builtin
    assert run_tokens(capsys, "--model", f"kvos-test/tiny-llama@{commit}") == by_tag
    assert run_tokens(capsys, "--model", "kvos-test/tiny-llama@main") == builtin


def test_a_gguf_in_a_hub_repository(tmp_path, offline_cache, capsys):
    path = tmp_path / "tiny.Q8_0.gguf"
    write_gguf(path, tiny.TINY_CONFIG, tiny.tiny_weights(tiny.TINY_CONFIG, 0), tiny.tiny_tokenizer())
    card = tmp_path / "README.md"
    card.write_text("a model card")
    hub_cache.put(offline_cache, "kvos-test/tiny-GGUF", {path.name: path, card.name: card})
    by_colon = run_tokens(capsys, "--model", "kvos-test/tiny-GGUF:tiny.Q8_0.gguf")
    assert run_tokens(capsys, "--model", "kvos-test/tiny-GGUF", "--gguf-file", "tiny.Q8_0.gguf") == by_colon
    assert len(by_colon) == 2 and all(len(t) == 12 for t in by_colon)
    # The repository without a file named: one line naming the GGUF files to choose from
    assert main(["run", "--model", "kvos-test/tiny-GGUF", "hi"]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kvos: ")]
    assert "kvos-test/tiny-GGUF:tiny.Q8_0.gguf or --gguf-file tiny.Q8_0.gguf" in err, err
    assert main(["run", "--model", "kvos-test/tiny-GGUF:missing.gguf", "hi"]) == 2
    assert "not in the hub cache" in capsys.readouterr().err
    with pytest.raises(SystemExit):                       # --gguf-file needs a hub id
        main(["run", "--model", "tiny-llama", "--gguf-file", "x.gguf", "hi"])
    assert "--gguf-file names a file in a hub repository" in capsys.readouterr().err


def test_offline_and_not_cached_is_one_line_naming_the_three_ways(offline_cache, capsys):
    assert main(["run", "--model", "HuggingFaceTB/Not-Cached-Here", "hi"]) == 2          # ENOENT
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kvos: ")]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("kvos: ENOENT: HuggingFaceTB/Not-Cached-Here is not in the hub cache")
    assert "HF_HUB_OFFLINE" in line and str(offline_cache) in line
    assert "a name (smollm2-135m" in line and "a path" in line and "a hub id" in line
    assert main(["run", "--model", "no-such-model", "hi"]) == 2
    assert "a hub id (ORG/NAME[@REVISION]" in capsys.readouterr().err


def test_online_it_asks_huggingface_hub_for_what_a_model_needs(tmp_path, monkeypatch):
    """With the hub reachable (not offline) resolve() hands the download to huggingface_hub: only a model's
    files, top-level, of the named revision, into $HF_HUB_CACHE; the hub's refusals become one-line errors.
    (This machine cannot reach the hub: the two download functions are stood in for.)"""
    import huggingface_hub
    from huggingface_hub import errors

    from kernel.errors import KvosError
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_resolved", {})
    folder = hub_cache.write_tiny_folder(tmp_path / "snapshot")
    asked = []

    def snapshot_download(repo_id, **kwargs):
        asked.append((repo_id, kwargs))
        return str(folder)

    def hf_hub_download(repo_id, filename, **kwargs):
        asked.append((repo_id, {"filename": filename, **kwargs}))
        return str(folder / "config.json")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    assert hub.resolve("org/model@v1") == folder
    assert hub.resolve("org/model@v1") == folder and len(asked) == 1            # once per process
    repo, kwargs = asked[0]
    assert repo == "org/model" and kwargs["revision"] == "v1" and kwargs["local_files_only"] is False
    assert kwargs["cache_dir"] == tmp_path / "hub" and kwargs["ignore_patterns"] == ["*/*"]
    assert {"config.json", "tokenizer.json", "*.safetensors"} <= set(kwargs["allow_patterns"])
    hub.resolve("org/model:m.Q4_0.gguf")
    assert asked[1] == ("org/model", {"filename": "m.Q4_0.gguf", "revision": None, "cache_dir": tmp_path / "hub",
                                      "local_files_only": False})

    def refuses(kind):
        def download(repo_id, **kwargs):
            err = kind.__new__(kind)                 # its constructor wants an HTTP response: not needed here
            Exception.__init__(err, "refused")
            raise err
        return download
    for kind, errno, said in ((errors.RepositoryNotFoundError, "ENOENT", "no such repository"),
                              (errors.GatedRepoError, "EPERM", "gated"),
                              (errors.RevisionNotFoundError, "ENOENT", "no revision"),
                              (errors.LocalEntryNotFoundError, "ENOENT", "the hub cannot be reached")):
        monkeypatch.setattr(huggingface_hub, "snapshot_download", refuses(kind))
        with pytest.raises(KvosError) as err:
            hub.resolve(f"org/{kind.__name__}@r")
        assert err.value.errno == errno and said in err.value.reason, err.value.reason


@pytest.mark.slow
def test_smollm2_by_hub_id_matches_the_named_model(tmp_path, hub_only, capsys):
    """SmolLM2-135M-Instruct, converted from its GGUF by transformers and saved with save_pretrained, in the
    hub cache as HuggingFaceTB/SmolLM2-135M-Instruct: the same greedy tokens as smollm2-135m."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from userspace.programs import fetch
    gguf, _ = fetch.model_file("smollm2-135m", progress=False)
    saved = tmp_path / "saved"
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a model read from a GGUF as quantized and refuses to save it; its weights are
    # dequantized float32 by then, which is what a hub repository of this model holds.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(saved)
    del model
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(saved)
    files = {p.name: p for p in saved.iterdir() if p.is_file()}
    hub_cache.put(hub_only, "HuggingFaceTB/SmolLM2-135M-Instruct", files)
    hub_cache.check(hub_only, "HuggingFaceTB/SmolLM2-135M-Instruct")
    named = run_tokens(capsys, "--model", "smollm2-135m")
    assert run_tokens(capsys, "--model", "HuggingFaceTB/SmolLM2-135M-Instruct") == named
