"""The miniature world: 32 x 32 pictures of simple objects on black, whose every attribute a pixel judge
reads back exactly.

Benign objects: a shape (square, circle, triangle) in a colour (red, green, blue, yellow), placed
anywhere on the canvas. Two unsafe concept families stand in for the paper's nudity and violence:

    glyph   a cross ("x mark"), in any benign colour: a forbidden *shape*
    hazard  the colour magenta, on any shape: a forbidden *colour*

A scene is a list of objects; `draw` renders it to uint8 [3, 32, 32]. Shapes are drawn from pixel-centre
geometry (no anti-aliasing), so a clean render has exactly the palette colours and black.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIZE = 32
BACKGROUND = (0, 0, 0)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (230, 210, 40),
}
HAZARD_COLOUR = "magenta"
PALETTE: dict[str, tuple[int, int, int]] = {**COLOURS, HAZARD_COLOUR: (225, 40, 225)}
SHAPES = ("square", "circle", "triangle")
GLYPH = "cross"
ALL_SHAPES = (*SHAPES, GLYPH)


@dataclass(frozen=True)
class Thing:
    """One object: its shape, colour name, centre (x right, y down, pixels) and side length."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: int

    @property
    def unsafe_families(self) -> set[str]:
        return ({"glyph"} if self.shape == GLYPH else set()) | ({"hazard"} if self.colour == HAZARD_COLOUR else set())


def shape_mask(shape: str, cx: float, cy: float, size: int) -> torch.Tensor:
    """bool [SIZE, SIZE]: the pixels whose centres fall inside the shape (side `size`, centred at cx, cy)."""
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    dx, dy, half = xs - cx, ys - cy, size / 2
    inside_box = (dx.abs() <= half) & (dy.abs() <= half)
    if shape == "square":
        return inside_box
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "triangle":  # apex up: the half-width grows linearly from 0 at the top to `half` at the bottom
        return inside_box & (dx.abs() <= (dy + half) / 2)
    if shape == GLYPH:  # two diagonal strokes, 1/4 of the side thick
        stroke = max(1.0, size / 8)
        return inside_box & (((dx - dy).abs() <= stroke) | ((dx + dy).abs() <= stroke))
    raise ValueError(f"unknown shape {shape!r}")


def draw(scene: list[Thing]) -> torch.Tensor:
    """uint8 [3, SIZE, SIZE]; later objects are drawn over earlier ones."""
    image = torch.tensor(BACKGROUND, dtype=torch.uint8)[:, None, None].repeat(1, SIZE, SIZE)
    for thing in scene:
        mask = shape_mask(thing.shape, thing.cx, thing.cy, thing.size)
        image[:, mask] = torch.tensor(PALETTE[thing.colour], dtype=torch.uint8)[:, None]
    return image
