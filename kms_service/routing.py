"""The route class every router uses: request JSON is parsed strictly with orjson.

The stdlib parser FastAPI uses accepts `NaN`/`Infinity` and turns non-UTF-8 bodies into a generic
400. orjson rejects both, and its errors subclass json.JSONDecodeError, so FastAPI reports them
as `json_invalid`, which the app renders as `malformed_json`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = orjson.loads(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict_handler
