"""Zero-padding of image batches and its adjoint, the crop: two nodes that fill every rule table.

* ``zero_pad2d(x, (top, bottom, left, right))``: images ``(n, H, W, C)`` inside a border of zeros,
  ``(n, H + top + bottom, W + left + right, C)`` (Keras's ``ZeroPadding2D``);
* ``crop2d(G, ...)``: the inside of padded images, the adjoint of the padding (so each one's VJP is
  the other and its tangent is itself applied to the tangent).

Neither needs a kernel of its own: padding is ``im2col`` with a 1x1 window and the padding
``Geometry`` (each output pixel's window holds one input pixel, or zeros outside the image), and
the crop is ``col2im`` of that geometry (each input pixel sums the one window that holds it).

>>> import symdl as sd
>>> x = sd.input("x", (2, 3, 1))
>>> p = zero_pad2d(x, (1, 0, 2, 1)); p.out_image
(3, 6, 1)
>>> print(sd.grad(sd.sum_squares(p), [x])[x])
crop2d(2*(zero_pad2d(x)))
"""
from __future__ import annotations

import sympy as sp
from sympy.matrices.expressions import MatrixExpr
from sympy.printing.precedence import PRECEDENCE

from ..autodiff.jvp import JVP, linear_in_first_operand
from ..autodiff.vjp import VJP
from ..graph.nodes import PRINT_RULES, Ops, Printable, ShapeMismatch, name_of, shape_text
from ..ir.kernels import Geometry
from ..ir.lowering import LOWER, lower_expansion
from .conv import Patches, PatchesAdjoint, Reshape, _entry_of, image_shape


class _Border(Printable, Ops, MatrixExpr):
    """A node over an image batch and the padding ``Geometry`` (1x1 window, stride 1): the image
    ``(H, W, C)`` and the padded ``(OH, OW, C)``, ``pt`` rows above and ``pl`` columns left."""

    precedence = PRECEDENCE["Atom"]

    def __new__(cls, x, geometry):
        return MatrixExpr.__new__(cls, x, sp.Tuple(*Geometry(geometry)))

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.args[1])

    def _entry(self, i, j, **kw):
        return _entry_of(self, i, j, **kw)


class ZeroPad2D(_Border):
    """``zero_pad2d(x)``: images ``x`` with ``pt``/``pl`` zero rows/columns before, the rest after."""

    notation = "zero_pad2d(A): the images A inside a border of zeros (crop2d, its adjoint, takes the inside back)"

    @property
    def shape(self):
        g = self.geometry
        return (self.args[0].shape[0] / (g.H * g.W) * g.OH * g.OW, sp.Integer(g.C))

    @property
    def out_image(self):
        g = self.geometry
        return (g.OH, g.OW, g.C)

    def _int_entry(self, i, j, **kw):
        g = self.geometry
        b, r = divmod(int(i), g.OH * g.OW)
        y, x = r // g.OW - g.pt, r % g.OW - g.pl
        if 0 <= y < g.H and 0 <= x < g.W:
            return self.args[0]._entry((b * g.H + y) * g.W + x, j, **kw)
        return sp.Integer(0)

    @property
    def expansion(self):
        """``im2col`` of the padding geometry: a 1x1 window per output pixel (zeros off the image)."""
        return Reshape(Patches(self.args[0], self.geometry), *self.shape, self.out_image)


class Crop2D(_Border):
    """``crop2d(G)``: the ``H x W`` inside of padded images ``G`` (the adjoint of ``zero_pad2d``)."""

    notation = "crop2d(G): the inside of padded images G, the adjoint of zero_pad2d"

    @property
    def shape(self):
        g = self.geometry
        return (self.args[0].shape[0] / (g.OH * g.OW) * g.H * g.W, sp.Integer(g.C))

    @property
    def out_image(self):
        g = self.geometry
        return (g.H, g.W, g.C)

    def _int_entry(self, i, j, **kw):
        g = self.geometry
        b, r = divmod(int(i), g.H * g.W)
        y, x = r // g.W + g.pt, r % g.W + g.pl
        return self.args[0]._entry((b * g.OH + y) * g.OW + x, j, **kw)

    @property
    def expansion(self):
        """``col2im`` of the padding geometry: each kept pixel sums the one window that holds it."""
        return Reshape(PatchesAdjoint(self.args[0], self.geometry), *self.shape, self.out_image)


def zero_pad2d(x, pads):
    """Images ``x`` ``(n, H, W, C)`` padded with zeros: ``pads = (top, bottom, left, right)``."""
    image = image_shape(x)
    if image is None:
        raise ShapeMismatch(f"zero_pad2d: {name_of(x)} {shape_text(x)} is not an image batch (n, h, w, c)")
    top, bottom, left, right = (int(p) for p in pads)
    if min(top, bottom, left, right) < 0:
        raise ValueError(f"zero_pad2d: padding must be >= 0, got {tuple(pads)}")
    if top == bottom == left == right == 0:
        return x
    H, W, C = image
    return ZeroPad2D(x, (H, W, C, 1, 1, 1, 1, top, left, H + top + bottom, W + left + right))


# --------------------------------------------------------------------------- rules


@VJP.rule(ZeroPad2D)
def _vjp_pad(node, G):
    return [(node.args[0], Crop2D(G, node.geometry))]


@VJP.rule(Crop2D)
def _vjp_crop(node, G):
    return [(node.args[0], ZeroPad2D(G, node.geometry))]


JVP.rule(ZeroPad2D, Crop2D)(linear_in_first_operand)


LOWER.rule(ZeroPad2D, Crop2D)(lower_expansion)  # the copy kernels of each one's expansion


@PRINT_RULES.rule(ZeroPad2D, Crop2D)
def _print(node, printer, latex=False):
    label = "zero_pad2d" if isinstance(node, ZeroPad2D) else "crop2d"
    inner = printer._print(node.args[0])
    if latex:
        return r"\operatorname{%s}\left(%s\right)" % (label.replace("_", r"\_"), inner)
    return f"{label}({inner})"


__all__ = ["zero_pad2d", "ZeroPad2D", "Crop2D"]
