"""vLLM's runtime LoRA routes: POST /v1/load_lora_adapter and /v1/unload_lora_adapter, root's key only.

load {"lora_name", "lora_path"}: root spawns a tenant named lora_name running
BASE+lora:lora_path (userspace/programs/lora.py), whose processes share their base's batches;
requests then name it as their model with the root key (a tenant key serves its own tenant only).
The base is the model of the tenant `base_model` names (a kvos extension: a tenant's name or its
model), which may be left out while kvosd serves one model that is not an adapter. unload
{"lora_name"} kills that tenant (its processes end, its pages go back); only an adapter's tenant
is unloaded this way. Success is vLLM's answer, 200 with a line of text; errors are OpenAI's shape.
"""
from __future__ import annotations

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kernel.errors import EINVAL, EPERM, ESRCH, KvosError
from userspace.daemon.openapi_doc import request_body
from userspace.daemon.sysapi import json_object

MARK = "+lora:"            # userspace/programs/lora.py's spec: BASE+lora:ADAPTER
STRICT = ConfigDict(strict=True, extra="forbid")


def base_of(model: str) -> str | None:
    """The base model of an adapter's program (BASE+lora:ADAPTER), None for any other program."""
    base, mark, _ = model.rpartition(MARK)
    return base if mark else None


class LoadLoraRequest(BaseModel):
    model_config = STRICT
    lora_name: str = Field(min_length=1, max_length=64)
    lora_path: str = Field(min_length=1, max_length=4096)
    base_model: str | None = None        # kvos: the tenant (its name or model) whose model is the base
    load_inplace: bool = False           # vLLM's: replace a loaded adapter of that name (refused: unload first)


class UnloadLoraRequest(BaseModel):
    model_config = STRICT
    lora_name: str = Field(min_length=1, max_length=64)
    lora_int_id: int | None = None       # vLLM's internal id: names nothing here


def _parse(model_cls, body: dict):
    try:
        return model_cls.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "body"
        raise KvosError(EINVAL, f"{where}: {first['msg']}") from None


class LoraAPI:
    def __init__(self, daemon):
        self.daemon = daemon

    def _root(self, request: Request):
        who = self.daemon.authenticate(request)
        if who.tid is not None:
            raise KvosError(EPERM, "loading and unloading LoRA adapters takes the root key (they are tenants)")
        return who.handle

    def _infos(self, sys) -> list:
        return [sys.tenantinfo(t.tid) for t in sys.schedstat().tenants]

    def _base(self, sys, named: str | None) -> str:
        """The model spec of the base: the named tenant's, or the one model kvosd serves."""
        bases = [t for t in self._infos(sys) if base_of(t.model) is None]
        spec = {t.name: self.daemon.models.get(t.name, t.model) for t in bases}
        if named is not None:
            found = [t.name for t in bases if named in (t.name, t.model, spec[t.name])]
            if not found:
                raise KvosError(ESRCH, f"base_model: no tenant serves a base model named {named!r}")
            return spec[found[0]]
        if len(set(spec.values())) != 1:
            raise KvosError(EINVAL, f"base_model: name the base, one of {sorted(set(spec.values()))}")
        return next(iter(spec.values()))

    async def load(self, request: Request):
        sys = self._root(request)
        self.daemon.refuse_if_draining("spawn_tenant")
        req = _parse(LoadLoraRequest, await json_object(request, "load_lora_adapter"))
        if req.load_inplace:
            raise KvosError(EINVAL, "load_inplace is not supported by kvosd: unload the adapter, then load it")

        def run():
            sys.spawn_tenant(f"{self._base(sys, req.base_model)}{MARK}{req.lora_path}", name=req.lora_name)
        await anyio.to_thread.run_sync(run)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    async def unload(self, request: Request):
        sys = self._root(request)
        req = _parse(UnloadLoraRequest, await json_object(request, "unload_lora_adapter"))

        def run():
            found = [t for t in self._infos(sys) if t.name == req.lora_name]
            if not found:
                raise KvosError(ESRCH, f"no LoRA adapter named {req.lora_name!r} is loaded")
            if base_of(found[0].model) is None:
                raise KvosError(EINVAL, f"{req.lora_name!r} is a tenant of its own model, not a LoRA adapter: "
                                        f"kill_tenant removes it")
            sys.kill_tenant(found[0].tid)
        await anyio.to_thread.run_sync(run)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")


def add_routes(app: FastAPI, daemon) -> list:
    """Mount the two routes; returns their request models for the OpenAPI description."""
    api = LoraAPI(daemon)

    app.add_api_route("/v1/load_lora_adapter", api.load, methods=["POST"], tags=["openai"],
                      summary="Load a LoRA adapter on a served base model as a tenant, as vLLM's (root's key)",
                      openapi_extra=request_body(LoadLoraRequest))
    app.add_api_route("/v1/unload_lora_adapter", api.unload, methods=["POST"], tags=["openai"],
                      summary="Unload a LoRA adapter: its tenant is killed, as vLLM's (root's key)",
                      openapi_extra=request_body(UnloadLoraRequest))
    return [LoadLoraRequest, UnloadLoraRequest]
