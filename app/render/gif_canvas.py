"""The canvas a GIF really needs: its logical screen, grown by every frame that overhangs it.

Pillow grows a GIF's canvas when it seeks to a frame whose descriptor reaches past the logical
screen, and allocates it (and the frame's disposal area) inside that seek. So a 160x100 GIF
whose fourth frame claims 65535x65535 passes a header check and then asks for gigabytes.
Walking the blocks first, the way Pillow 13's GifImagePlugin._seek walks them (byte by byte,
skipping what it does not know), lets check_pixels judge the real canvas before any frame is
decoded. Found by tests/unit/test_fuzz_render.py.
"""

from __future__ import annotations


class _Reader:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos

    def read(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def sub_block(self) -> bytes | None:
        """GifImageFile.data(): one length-prefixed block, None at a zero length or the end."""
        size = self.read(1)
        return self.read(size[0]) if size and size[0] else None


def gif_canvas_size(data: bytes) -> tuple[int, int]:
    """Width and height of the largest canvas any frame of this GIF makes Pillow allocate."""
    width, height = int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    reader = _Reader(data, 13 + (3 << ((data[10] & 7) + 1) if len(data) > 10 and data[10] & 0x80 else 0))
    frame = 0
    while True:
        extent = _next_descriptor(reader, frame)
        if extent is None:
            return width, height
        width, height = max(width, extent[0]), max(height, extent[1])
        while reader.sub_block() is not None:  # the frame's LZW data
            pass
        frame += 1


def _next_descriptor(reader: _Reader, frame: int) -> tuple[int, int] | None:
    """Right and bottom edge of the next image descriptor, or None when no frame follows."""
    while True:
        introducer = reader.read(1)
        if not introducer or introducer == b";":
            return None
        if introducer == b"!":
            label = reader.read(1)
            block = reader.sub_block()
            if label == b"\xfe":  # comment: its blocks, and nothing more
                while block is not None:
                    block = reader.sub_block()
                continue
            if label == b"\xff" and frame == 0 and block is not None and block.startswith(b"NETSCAPE2.0"):
                reader.sub_block()
            while reader.sub_block() is not None:
                pass
        elif introducer == b",":
            descriptor = reader.read(9)
            if len(descriptor) < 9:
                return None  # Pillow fails on this frame itself
            x0, y0, w, h = (int.from_bytes(descriptor[i : i + 2], "little") for i in (0, 2, 4, 6))
            if descriptor[8] & 0x80:
                reader.read(3 << ((descriptor[8] & 7) + 1))
            reader.read(1)  # LZW minimum code size
            return x0 + w, y0 + h
