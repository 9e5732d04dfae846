"""Remote image and video URLs in chat requests: fetched into data: URLs when the server allows it, else refused."""

from __future__ import annotations

import asyncio
import base64

from aiohttp import ClientError, ClientSession, ClientTimeout

from qwen3vl_epd.openai_api import protocol as api


async def fetch_remote_media(chat: api.ChatRequest, config) -> None:
    """http(s) image and video URLs → data: URLs, when enabled; refused otherwise."""
    if not chat.remote_media:
        return
    if not config.allow_remote_images:
        param, _, kind = chat.remote_media[0]
        raise api.invalid(f"{param}: remote {kind} URLs are not fetched by this server; send the {kind} as a "
                          "data: URL (or start the OpenAI server with --allow-remote-images)", param)
    timeout = ClientTimeout(total=config.fetch_timeout_s)
    async with ClientSession(timeout=timeout) as session:
        for param, part, kind in chat.remote_media:
            limit = config.max_image_bytes if kind == "image" else config.max_video_bytes
            part["url"] = await _fetch(session, param, part["url"], limit, kind)


async def _fetch(session: ClientSession, param: str, url: str, limit: int, kind: str) -> str:
    try:
        async with session.get(url) as reply:
            if reply.status != 200:
                raise api.invalid(f"{param}: fetching {url} answered HTTP {reply.status}", param)
            data = await reply.content.read(limit + 1)
    except (ClientError, asyncio.TimeoutError) as e:
        raise api.invalid(f"{param}: fetching {url} failed: {e or type(e).__name__}", param) from None
    if len(data) > limit:
        raise api.invalid(f"{param}: {url} is over the limit of {limit} encoded bytes", param)
    return f"data:{kind};base64," + base64.b64encode(data).decode()
