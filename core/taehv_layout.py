"""TAEHV's layout (madebyollin/taehv, `taew2_1.pth` for Wan 2.1), torch-free: the one table that the module
(mirage.model.taehv) is built from and the runtime's codec graphs (mirage.core.graphs.taehv_graphs) take their
state shapes from, so the two cannot disagree.

The encoder has 3 stages, each a TPool (frames / TIME_DOWNSCALE[s]), a stride-2 conv and MEMBLOCKS MemBlocks at
ENCODER_WIDTH channels; the decoder 3 stages, each MEMBLOCKS MemBlocks at WIDTHS[s], a x2 upsample and a TGrow
(frames x TIME_UPSCALE[s]). A MemBlock's memory is the last frame of its input: one (C, h, w) frame per video.
"""
from __future__ import annotations

import math

LATENT_CHANNELS = 16  # Wan 2.1's latent width
WIDTHS = (256, 128, 64, 64)  # the decoder's stages, then its last conv's input
TIME_UPSCALE = (1, 2, 2)  # TAEHV's default decoder_time_upscale (False, True, True)
ENCODER_WIDTH = 64
TIME_DOWNSCALE = (2, 2, 1)  # TAEHV's default encoder_time_downscale (True, True, False)
MEMBLOCKS = 3  # per stage, in both directions
STRIDE = (math.prod(TIME_DOWNSCALE), 2 ** len(TIME_DOWNSCALE), 2 ** len(TIME_DOWNSCALE))  # (frames, height, width)
# the decoder's first latent frame stands for one video frame, but decodes to 4: its first 3 are warm-up frames
WARM_UP_FRAMES = math.prod(TIME_UPSCALE) - 1


def decoder_memory(h: int, w: int) -> list[tuple[int, int, int]]:
    """(C, h_l, w_l) of each decoder MemBlock's memory, in order, for latent frames of h x w."""
    return [(WIDTHS[s], h << s, w << s) for s in range(len(TIME_UPSCALE)) for _ in range(MEMBLOCKS)]


def encoder_memory(height: int, width: int) -> list[tuple[int, int, int]]:
    """(C, h_l, w_l) of each encoder MemBlock's memory, in order, for video frames of height x width (a
    multiple of 8: each stage halves them)."""
    return [(ENCODER_WIDTH, height >> (s + 1), width >> (s + 1)) for s in range(len(TIME_DOWNSCALE))
            for _ in range(MEMBLOCKS)]
