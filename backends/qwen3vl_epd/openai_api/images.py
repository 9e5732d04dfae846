"""Remote image URLs in chat requests: fetched into data: URLs when the server allows it, else refused."""

from __future__ import annotations

import asyncio
import base64

from aiohttp import ClientError, ClientSession, ClientTimeout

from qwen3vl_epd.openai_api import protocol as api


async def fetch_remote_images(chat: api.ChatRequest, config) -> None:
    """http(s) image URLs → data: URLs, when enabled; refused otherwise."""
    if not chat.remote_images:
        return
    if not config.allow_remote_images:
        param = chat.remote_images[0][0]
        raise api.invalid(f"{param}: remote image URLs are not fetched by this server; send the image as a "
                          "data: URL (or start the OpenAI server with --allow-remote-images)", param)
    timeout = ClientTimeout(total=config.fetch_timeout_s)
    async with ClientSession(timeout=timeout) as session:
        for param, image_url in chat.remote_images:
            image_url["url"] = await _fetch(session, param, image_url["url"], config.max_image_bytes)


async def _fetch(session: ClientSession, param: str, url: str, limit: int) -> str:
    try:
        async with session.get(url) as reply:
            if reply.status != 200:
                raise api.invalid(f"{param}: fetching {url} answered HTTP {reply.status}", param)
            data = await reply.content.read(limit + 1)
    except (ClientError, asyncio.TimeoutError) as e:
        raise api.invalid(f"{param}: fetching {url} failed: {e or type(e).__name__}", param) from None
    if len(data) > limit:
        raise api.invalid(f"{param}: {url} is over the limit of {limit} encoded bytes", param)
    return "data:image;base64," + base64.b64encode(data).decode()
