"""Bad input to programs and loaders: each is a KvosError with a clear reason, never a crash."""
import json

import pytest
import torch

from kernel.devices.torchdev import TorchDevice
from kernel.errors import KvosError
from kernel.program import exec_program
from tests.helpers.hf_reference import hf_config_dict
from tests.helpers.tiny_gguf import write_gguf
from userspace.programs import loader, tiny
from userspace.programs.config import LlamaConfig
from userspace.programs.loader import load_program


@pytest.fixture(scope="module")
def program():
    return exec_program("tiny-llama", TorchDevice("cpu"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVOS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, tiny.TINY_CONFIG, tiny.tiny_weights(tiny.TINY_CONFIG, 0), tiny.tiny_tokenizer())
    return path.read_bytes()


def raises(errno, match=None):
    return pytest.raises(KvosError, match=f"^{errno}: .*" + (match or ""))


@pytest.mark.parametrize("ids, errno, match", [
    ([], "EINVAL", "empty prompt"),
    ([1, 512], "EINVAL", "token id 512 is outside the vocabulary"),
    ([-1, 5], "EINVAL", "token id -1 is outside"),
    ([1, 2.0], "EINVAL", "token ids must be integers"),
    ([True], "EINVAL", "token ids must be integers"),
    ("hello", "EINVAL", "token ids must be a list"),
    (torch.tensor([1.0]), "EINVAL", "1-D integer tensor"),
    ([7] * 2049, "ENOMEM", "longer than the context"),
])
def test_check_tokens_refuses(program, ids, errno, match):
    with raises(errno, match):
        program.check_tokens(ids)


def test_check_tokens_accepts(program):
    program.check_tokens([0, 511] + [5] * 2046)              # exactly the context
    program.check_tokens(torch.tensor([3, 4], dtype=torch.int32))


def test_unknown_model(cache):
    with raises("ENOENT", "no program named 'no-such-model'"):
        exec_program("no-such-model", TorchDevice("cpu"))
    assert loader.load("no-such-model", TorchDevice("cpu")) is None       # another binfmt may claim it
    with raises("ENOENT", "no program named"):
        load_program("no-such-model")


def test_missing_gguf_path(cache, tmp_path):
    with raises("ENOENT", ".*missing.gguf: no such model file"):
        exec_program(str(tmp_path / "missing.gguf"), TorchDevice("cpu"))


def test_truncated_gguf(cache, tmp_path, gguf_bytes):
    for cut in (len(gguf_bytes) // 2, 200, 10):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(gguf_bytes[:cut])
        with raises("EIO", ".*(corrupt or truncated|truncated) GGUF"):
            load_program(str(path))
    assert not (cache / "converted").exists()                 # nothing half-converted left behind


def test_not_a_gguf(cache, tmp_path, gguf_bytes):
    path = tmp_path / "text.gguf"
    path.write_text("this is not a model")
    with raises("EIO", ".*not a GGUF file"):
        load_program(str(path))
    garbled = bytearray(gguf_bytes)
    garbled[8:64] = bytes(range(200, 256))                    # counts and the first key: nonsense
    path = tmp_path / "garbled.gguf"
    path.write_bytes(bytes(garbled))
    with raises("EIO", ".*corrupt or truncated GGUF"):
        load_program(str(path))


def test_unsupported_architecture(cache, tmp_path):
    path = tmp_path / "falcon.gguf"
    write_gguf(path, tiny.TINY_CONFIG, tiny.tiny_weights(tiny.TINY_CONFIG, 0), tiny.tiny_tokenizer(), arch="falcon")
    with raises("EINVAL", ".*architecture 'falcon' is not supported"):
        load_program(str(path))


def test_hf_folder_problems(cache, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    assert loader.load(str(folder), TorchDevice("cpu")) is None          # no config.json: not ours
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with raises("EINVAL", "config.json: model_type 'gpt2'"):
        load_program(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with raises("EINVAL", "config.json: missing field"):
        load_program(str(folder))
    (folder / "config.json").write_text(json.dumps(hf_config_dict(tiny.TINY_CONFIG)))
    with raises("ENOENT", "no \\*.safetensors"):
        load_program(str(folder))
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with raises("ENOENT", "no tokenizer.json"):
        load_program(str(folder))
    tiny.tiny_tokenizer().save(folder / "tokenizer.json")
    with raises("EIO", "corrupt safetensors file"):
        load_program(str(folder))


def test_devices_and_dtypes(monkeypatch):
    class SimDevice:
        kind = "sim"
    with raises("ENODEV", "LLaMA programs run on cpu or cuda"):
        load_program("tiny-llama", SimDevice())
    with raises("ENODEV", "no such device"):
        load_program("tiny-llama", "warp-drive")
    with raises("EINVAL", "dtype 'float8'"):
        load_program("tiny-llama", "cpu", dtype="float8")
    with raises("EINVAL", "programs on the cpu run in float32"):
        load_program("tiny-llama", "cpu", dtype="bf16")
    monkeypatch.setenv("KVOS_DTYPE", "float16")
    with raises("EINVAL", "programs on the cpu run in float32"):
        load_program("tiny-llama", "cpu")
    monkeypatch.delenv("KVOS_DTYPE")
    monkeypatch.setenv("KVOS_THREADS", "many")          # threads are the kernel's to set, at boot
    import kernel
    with raises("EINVAL", "KVOS_THREADS"):
        kernel.boot()


def test_bad_configs():
    good = tiny.TINY_CONFIG.to_dict()
    for change, match in [({"num_key_value_heads": 3}, "not a multiple"), ({"hidden_size": 0}, "positive integer"),
                          ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope scaling 'yarn'"),
                          ({"head_dim": 31}, "must be even")]:
        with raises("EINVAL", f"model config: .*{match}"):
            LlamaConfig.from_dict({**good, **change})


def test_bad_chat(program):
    with raises("EINVAL", "a chat must be a list"):
        program.apply_chat_template("hello")
    with raises("EINVAL", "chat template"):
        program.apply_chat_template([{"content": "no role"}])
    with raises("EINVAL", "text to encode must be a string"):
        program.encode(42)


def test_a_name_too_long_for_a_file_is_enoent_not_an_oserror():
    """Found by fuzzing kvosd: asking the file system about a 5,000-character name raised OSError
    (a 500 over HTTP); such a name is no model, no adapter."""
    import kernel
    k = kernel.boot(memory="1MiB")
    sys = k.syscalls()
    for spec in ("0" * 5000, "0" * 5000 + ".gguf", "org/" + "b" * 300, "tiny-llama+lora:" + "x" * 5000):
        with pytest.raises(KvosError, match="^ENOENT"):
            sys.spawn_tenant(spec)
    assert not k.tenants
