"""Helpers shared by the inference, serving and browser tests: test images and a live server."""

from __future__ import annotations

import base64
import io
import random
import threading
import time
from contextlib import contextmanager

from PIL import Image, ImageDraw


def shapes_image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A few coloured discs on a coloured background, different for every seed."""
    rng = random.Random(seed)
    colour = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
    image = Image.new("RGB", size, colour())
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        draw.ellipse([x, y, x + size[0] // 3, y + size[1] // 3], fill=colour())
    return image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


@contextmanager
def live_server(app):
    """Run `app` under a real uvicorn server on a free loopback port; yields its base URL."""
    import uvicorn

    from crossvlm.commands.serve import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
