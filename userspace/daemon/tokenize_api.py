"""/tokenize and /detokenize, shaped as vLLM's, on the tokenize and detokenize syscalls.

POST /tokenize takes {"prompt": text} or {"messages": [...], "tools": [...]} (a chat, in the model's
template, with the tools a chat completion would give it)
and answers {"count", "max_model_len", "tokens", "token_strs": null}: the ids kvosd would run.
POST /detokenize takes {"tokens": [...]} and answers {"prompt": text}. GET /tokenizer_info
answers the tokenizer's facts a client needs to tokenize as kvosd does (its special tokens' text,
chat template, context), as vLLM's: what evaluation harnesses' remote-tokenizer mode asks for.
"model" (a query parameter for GET) may be left out when the key serves one model. Errors are in
OpenAI's shape, as vLLM's are.
"""
from __future__ import annotations

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kernel.errors import EINVAL, KvosError
from userspace.daemon.openai_api import OpenAIAPI
from userspace.daemon.openai_requests import ChatMessage, chat_messages
from userspace.daemon.openapi_doc import request_body
from userspace.daemon.sysapi import json_object

UNSUPPORTED = "is not supported by kvosd"
SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")     # always present in tokenizer_info
STRICT = ConfigDict(strict=True, extra="forbid")


class TokenizeCompletionRequest(BaseModel):
    """Text, tokenized as a completion's prompt is: kvos adds no special tokens to text prompts."""
    model_config = STRICT
    model: str | None = None
    prompt: str
    add_special_tokens: bool = False
    return_token_strs: bool = False


class TokenizeChatRequest(BaseModel):
    """A chat, rendered in the model's template and tokenized as a chat completion's prompt is."""
    model_config = STRICT
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False
    continue_final_message: bool = False


class DetokenizeRequest(BaseModel):
    model_config = STRICT
    model: str | None = None
    tokens: list[int]


def _parse(model_cls, body: dict):
    try:
        req = model_cls.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "body"
        raise KvosError(EINVAL, f"{where}: {first['msg']}") from None
    for field in ("add_special_tokens", "return_token_strs"):
        if getattr(req, field, False):            # what kvos runs never has them: refused, not ignored
            raise KvosError(EINVAL, f"{field}=true {UNSUPPORTED} (text prompts run without added special "
                                    f"tokens, and token strings are not kept)")
    return req


class TokenizeAPI:
    def __init__(self, daemon, resolve):
        self.daemon, self.resolve = daemon, resolve

    def _tenant(self, who, model):
        """(handle, tid) of the tenant a request names; a key that serves one model may leave it out."""
        if model is not None:
            handle, tid, _ = self.resolve(who, model)
            return handle, tid
        if who.tid is not None:
            return who.handle, who.tid
        tenants = self.daemon.root.schedstat().tenants
        if len(tenants) != 1:
            raise KvosError(EINVAL, f"model: name one of the {len(tenants)} tenants' models")
        return who.handle, tenants[0].tid

    async def tokenize(self, request: Request):
        who = self.daemon.authenticate(request)
        body = await json_object(request, "tokenize")
        req = _parse(TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest, body)

        def run():
            handle, tid = self._tenant(who, req.model)
            if isinstance(req, TokenizeChatRequest):
                ids = handle.tokenize(tid, chat_messages(req), add_generation_prompt=req.add_generation_prompt,
                                      continue_final_message=req.continue_final_message, tools=req.tools)
            else:
                ids = handle.tokenize(tid, req.prompt)
            return ids, handle.tenantinfo(tid).max_context
        ids, context = await anyio.to_thread.run_sync(run)
        return JSONResponse({"count": len(ids), "max_model_len": context, "tokens": ids, "token_strs": None})

    async def detokenize(self, request: Request):
        who = self.daemon.authenticate(request)
        req = _parse(DetokenizeRequest, await json_object(request, "detokenize"))

        def run():
            handle, tid = self._tenant(who, req.model)
            return handle.detokenize(tid, req.tokens)
        return JSONResponse({"prompt": await anyio.to_thread.run_sync(run)})

    async def tokenizer_info(self, request: Request):
        who = self.daemon.authenticate(request)
        unknown = sorted(set(request.query_params) - {"model"})
        if unknown:
            raise KvosError(EINVAL, f"unknown query parameter {unknown[0]!r} (tokenizer_info takes model)")

        def run():
            handle, tid = self._tenant(who, request.query_params.get("model"))
            return handle.tenantinfo(tid)
        info = await anyio.to_thread.run_sync(run)
        return JSONResponse({"tokenizer_class": "kvos", "model": info.name, "model_max_length": info.max_context,
                             **dict.fromkeys(SPECIAL_ROLES), **info.special_tokens,
                             "chat_template": info.chat_template})


def add_routes(app: FastAPI, daemon) -> list:
    """Mount /tokenize and /detokenize; returns the request models for the OpenAPI description."""
    api = TokenizeAPI(daemon, OpenAIAPI(daemon).resolve)

    app.add_api_route("/tokenize", api.tokenize, methods=["POST"], tags=["openai"],
                      summary="Token ids of a prompt or a chat, as vLLM's /tokenize: what kvosd would run",
                      openapi_extra=request_body(TokenizeCompletionRequest, TokenizeChatRequest))
    app.add_api_route("/detokenize", api.detokenize, methods=["POST"], tags=["openai"],
                      summary="Text of token ids, as vLLM's /detokenize", openapi_extra=request_body(DetokenizeRequest))
    app.add_api_route("/tokenizer_info", api.tokenizer_info, methods=["GET"], tags=["openai"],
                      summary="The tokenizer's special tokens, chat template and context, as vLLM's /tokenizer_info",
                      openapi_extra={"parameters": [{"name": "model", "in": "query", "required": False,
                                                     "schema": {"type": "string"}}]})
    return [TokenizeCompletionRequest, TokenizeChatRequest, DetokenizeRequest]
