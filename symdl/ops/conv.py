"""Convolution and pooling: image nodes, their gradients and their lowering, in one module.

An image batch ``(n, H, W, C)`` (NHWC, as in Keras) is the matrix ``(n·H·W, C)``: one row
per pixel, one column per channel, the same memory as the NHWC array. Then

* ``conv2d(x, K) = patches(x) @ K``: ``patches`` (im2col) is a linear gather
  ``(n·H·W, C) -> (n·OH·OW, kh·kw·C)`` and ``K`` the kernel ``(kh, kw, c_in, c_out)`` as a
  ``(kh·kw·c_in, c_out)`` matrix. The result is again an image batch, a bias is a row
  broadcast, and the existing matrix-product rule gives ``∂L/∂K = patches(A)ᵀ·δ`` (the
  correlation of the layer input with δ) and ``∂L/∂patches = δ·Kᵀ``; the patch node's own
  rule is its adjoint ``col2im`` (a scatter-add, computed as a gather over input pixels), so
  the input gradient ``col2im(δ·Kᵀ)`` is the "full" correlation of δ with the flipped kernel.
* ``max_pool2d``/``avg_pool2d``: gathers ``(n·H·W, C) -> (n·OH·OW, C)``; their gradients are
  nodes too: ``maxpool_grad(x, G)`` routes each window's ``G`` to its first arg-max (ties as
  PyTorch), ``avgpool_grad(G)`` spreads it evenly. Every linear node's tangent (forward mode,
  ``explain_hvp``) is the node applied to the operand's tangent; maxpool's tangent and
  ``route_max``'s gradient are ``pick_max(x, V)``: each window's ``V`` at its first arg-max,
  built from the other nodes (``PickMax.expansion``), so it needs no kernel of its own.
* ``flatten``: ``(n·H·W, C) -> (n, H·W·C)``, row-major over ``(h, w, c)`` as Keras: the same
  memory read with another shape (``Reshape``).

Every node records its geometry (``ir.Geometry``), so shapes are checked when the node is
built. Each node lowers to one kernel of its own class (``ir.Im2Col``, ``ir.MaxPool``, ...),
except ``pick_max``.

>>> import symdl as sd
>>> x = sd.input("x", (8, 8, 1)); K = sd.param("K", (3, 3, 1, 4)); c = sd.param("c", 4)
>>> h = sd.max_pool2d(sd.relu(sd.conv2d(x, K, padding="same") + c), 2)
>>> image_shape(h), sd.flatten(h).shape
((4, 4, 4), (n, 64))
>>> g = sd.grad(sd.sum_squares(sd.conv2d(x, K)), [K, x])
>>> print(g[K]); print(g[x])
patches(x).T*(2*(patches(x)*K))
col2im((2*(patches(x)*K))*K.T)
"""
from __future__ import annotations

import numbers

import sympy as sp
from sympy.printing.precedence import PRECEDENCE
from sympy.matrices.expressions import MatAdd, MatMul, MatrixExpr

from ..autodiff.jvp import JVP, linear_in_first_operand
from ..autodiff.vjp import VJP
from ..graph.nodes import (
    PRINT_RULES, VARS, Broadcast, ImageInput, Map, Ops, Printable, ShapeMismatch, hadamard, make_map, name_of,
    shape_text,
)
from ..ir import kernels as ir
from ..ir.kernels import Geometry, Operand
from ..ir.lowering import LOWER, lower_expansion


# --------------------------------------------------------------------------- image geometry


def image_shape(e):
    """``(H, W, C)`` of an expression that is an image batch ``(n·H·W, C)``, else None.

    Leaves declared with ``sd.input(name, (H, W, C))`` and image nodes know their geometry;
    elementwise formulas, sums and matrix products on the right (a 1x1 convolution) keep it.
    """
    if isinstance(e, ImageInput):
        return tuple(e.image_shape)
    if isinstance(e, (ImageNode, Reshape)) or hasattr(type(e), "out_image"):  # other families' nodes (concat)
        return e.out_image
    rows = e.shape[0]
    if isinstance(e, Map) or isinstance(e, MatAdd):
        operands = e.operands if isinstance(e, Map) else e.args
        for o in operands:
            s = None if isinstance(o, Broadcast) else image_shape(o)
            if s is not None and o.shape == e.shape:
                return s
        return None
    if isinstance(e, MatMul):
        _, mats = e.as_coeff_matrices()
        first = mats[0]
        s = (first.geometry.OH, first.geometry.OW, None) if isinstance(first, Patches) else image_shape(first)
        if s is not None and mats[0].shape[0] == rows:
            return (s[0], s[1], int(e.shape[1]))
    return None


def _pair(v, what, where):
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        v = (v, v)
    try:
        a, b = v
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} must be an int or a pair of ints, got {v!r}") from None
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in (a, b)):
        raise ValueError(f"{where}: {what} must be an int or a pair of ints, got {v!r}")
    return int(a), int(b)


def _require_image(x, where):
    if not isinstance(x, MatrixExpr):
        raise TypeError(f"{where}: expected an image batch, got {x!r}")
    s = image_shape(x)
    if s is None:
        raise ShapeMismatch(f"{where}: {name_of(x)} {shape_text(x)} is not an image batch: declare images with "
                            "sd.input(name, (height, width, channels)), or pass the output of conv2d / pooling")
    return s


def conv_geometry(image, kernel, stride, padding, where) -> Geometry:
    """The geometry of a ``kernel = (kh, kw)`` window over ``image = (H, W, C)``.

    ``padding``: ``"valid"`` (none), ``"same"`` (TensorFlow/Keras: output ``ceil(H/s)``, the
    odd pixel of padding at the bottom/right), an int or a pair ``(ph, pw)`` (symmetric).
    """
    H, W, C = image
    kh, kw = kernel
    sh, sw = _pair(stride, "stride", where)
    if min(kh, kw) < 1 or min(sh, sw) < 1:
        raise ValueError(f"{where}: window {kh}x{kw} and stride ({sh}, {sw}) must be positive")
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            pt = pl = 0
            OH, OW = (H - kh) // sh + 1, (W - kw) // sw + 1
            bad = H < kh or W < kw
        elif mode == "same":
            OH, OW = -(-H // sh), -(-W // sw)
            pt = max((OH - 1) * sh + kh - H, 0) // 2
            pl = max((OW - 1) * sw + kw - W, 0) // 2
            bad = False
        else:
            raise ValueError(f"{where}: padding must be 'valid', 'same', an int or a pair, got {padding!r}")
    else:
        pt, pl = _pair(padding, "padding", where)
        if min(pt, pl) < 0:
            raise ValueError(f"{where}: padding must be >= 0, got {padding!r}")
        bad = H + 2 * pt < kh or W + 2 * pl < kw
        OH, OW = (H + 2 * pt - kh) // sh + 1, (W + 2 * pl - kw) // sw + 1
    if bad or OH < 1 or OW < 1:
        raise ShapeMismatch(f"{where}: a {kh}x{kw} window with stride ({sh}, {sw}) and padding {padding!r} does not "
                            f"fit an image of {H}x{W} pixels")
    return Geometry((H, W, C, kh, kw, sh, sw, pt, pl, OH, OW))


# --------------------------------------------------------------------------- nodes


def _entry_of(node, i, j, **kw):
    """An entry at integer indices; at symbolic ones (SymPy's matrix product sums over a dummy
    index) an element of the explicit matrix, which SymPy's ``Sum.doit`` then evaluates."""
    if isinstance(i, (int, sp.Integer)) and isinstance(j, (int, sp.Integer)):
        return node._int_entry(int(i), int(j), **kw)
    rows, cols = (int(d) for d in node.shape)
    return sp.ImmutableMatrix(rows, cols, lambda a, b: node._int_entry(a, b, **kw))[i, j]


class ImageNode(Printable, Ops, MatrixExpr):
    """Base of the image nodes: matrix operands, then the geometry as a SymPy tuple."""

    kernel = None  # the ir.ImageKernel class this node lowers to
    label = ""  # how it prints
    precedence = PRECEDENCE["Atom"]  # reads as a function call: no parentheses around it

    def __new__(cls, *args):
        *mats, geo = args
        return MatrixExpr.__new__(cls, *mats, sp.Tuple(*Geometry(geo)))

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.args[-1])

    @property
    def operands(self) -> tuple:
        return self.args[:-1]

    @property
    def in_image(self) -> tuple:
        g = self.geometry
        return (g.H, g.W, g.C)

    writes_image = False  # whether the result is the (n·H·W, C) input-shaped batch (a gradient)

    @property
    def out_image(self):
        g = self.geometry
        return (g.H, g.W, g.C) if self.writes_image else (g.OH, g.OW, g.C)

    @property
    def batch(self):
        """The batch size, from the first operand's rows (so ``xreplace({n: 2})`` reaches the shape)."""
        g = self.geometry
        pixels = g.H * g.W if self.reads_image else g.OH * g.OW
        return self.operands[0].shape[0] / pixels

    reads_image = True  # whether the first operand is the (n·H·W, ·) input (else the (n·OH·OW, ·) output)

    @property
    def shape(self):
        g = self.geometry
        pixels = g.H * g.W if self.writes_image else g.OH * g.OW
        return (self.batch * pixels, sp.Integer(g.C))

    # the explicit-scalar oracle: entries of small, concrete shapes (n substituted)
    def _entry(self, i, j, **kw):
        return _entry_of(self, i, j, **kw)

    def _pixel(self, row, H, W):
        b, r = divmod(int(row), H * W)
        return b, r // W, r % W

    def _window(self, b, oy, ox):
        """``[(row of x, dy, dx)]`` inside the image for the window of output pixel (b, oy, ox)."""
        g = self.geometry
        out = []
        for dy in range(g.kh):
            for dx in range(g.kw):
                iy, ix = oy * g.sh + dy - g.pt, ox * g.sw + dx - g.pl
                if 0 <= iy < g.H and 0 <= ix < g.W:
                    out.append(((b * g.H + iy) * g.W + ix, dy, dx))
        return out

    def _covering(self, row):
        """``[(output row, dy, dx)]`` of every window that contains input pixel ``row``."""
        g = self.geometry
        b, y, x = self._pixel(row, g.H, g.W)
        out = []
        for oy in range(g.OH):
            for ox in range(g.OW):
                dy, dx = y + g.pt - oy * g.sh, x + g.pl - ox * g.sw
                if 0 <= dy < g.kh and 0 <= dx < g.kw:
                    out.append(((b * g.OH + oy) * g.OW + ox, dy, dx))
        return out


class Patches(ImageNode):
    """``patches(x)`` (im2col): row ``(b, oy, ox)`` holds the window ``(dy, dx, c)`` it sees."""

    kernel, label = ir.Im2Col, "patches"
    notation = ("patches(A) (im2col): row (b, oy, ox) holds the window A[b, oy·s+dy, ox·s+dx, c]; "
                "patches(A)*K is the convolution A ⋆ K (⋆: correlation), and patches(A).T*δ = A ⋆ δ is ∂L/∂K")

    @property
    def shape(self):
        g = self.geometry
        return (self.batch * g.OH * g.OW, sp.Integer(g.kh * g.kw * g.C))

    @property
    def out_image(self):
        return None  # a patch matrix is not an image (its product with a kernel is)

    def _int_entry(self, i, j, **kw):
        g = self.geometry
        b, oy, ox = self._pixel(i, g.OH, g.OW)
        t, c = divmod(int(j), g.C)
        dy, dx = divmod(t, g.kw)
        for row, wy, wx in self._window(b, oy, ox):
            if (wy, wx) == (dy, dx):
                return self.operands[0]._entry(row, c, **kw)
        return sp.Integer(0)


class PatchesAdjoint(ImageNode):
    """``col2im(G)``, the adjoint of ``patches``: each input pixel sums what its windows hold for it."""

    kernel, label = ir.Col2Im, "col2im"
    notation = ("col2im(G), the adjoint of patches: each pixel sums what the windows containing it hold; "
                "col2im(δ*K.T) = δ ⋆ rot180(K), the full correlation of δ with the flipped kernel")
    reads_image = False
    writes_image = True

    def _int_entry(self, i, j, **kw):
        g = self.geometry
        G = self.operands[0]
        return sum((G._entry(r, (dy * g.kw + dx) * g.C + int(j), **kw) for r, dy, dx in self._covering(i)),
                   sp.Integer(0))


class MaxPool(ImageNode):
    """The maximum of each window, per channel."""

    kernel, label = ir.MaxPool, "maxpool"
    notation = "maxpool(A): the maximum of each window, per channel"

    def _int_entry(self, i, j, **kw):
        g = self.geometry
        b, oy, ox = self._pixel(i, g.OH, g.OW)
        return sp.Max(*[self.operands[0]._entry(r, j, **kw) for r, _, _ in self._window(b, oy, ox)])


class MaxPoolGrad(ImageNode):
    """``route_max(x, G)``: each window's ``G`` sent to the window's first arg-max of ``x``."""

    kernel, label = ir.MaxPoolGrad, "route_max"
    notation = "route_max(A, G): each window's G goes to the window's first arg-max of A (ties: the first, as PyTorch)"
    writes_image = True

    def _int_entry(self, i, j, **kw):
        """Pixel ``i`` collects ``G`` of each window whose first arg-max it is: larger than the
        window's entries before it, at least as large as those after (``sd.prove``'s scalar view)."""
        g = self.geometry
        x, G = self.operands[0], self.operands[1]
        xi = x._entry(i, j, **kw)
        total = sp.Integer(0)
        for w, _, _ in self._covering(i):
            rows = [r for r, _, _ in self._window(*self._pixel(w, g.OH, g.OW))]
            m = rows.index(int(i))
            first = [sp.StrictGreaterThan(xi, x._entry(r, j, **kw)) for r in rows[:m]]
            first += [sp.GreaterThan(xi, x._entry(r, j, **kw)) for r in rows[m + 1:]]
            total += sp.Piecewise((G._entry(w, j, **kw), sp.And(*first)), (0, True))
        return total


class AvgPool(ImageNode):
    """The mean of each window, per channel."""

    kernel, label = ir.AvgPool, "avgpool"
    notation = "avgpool(A): the mean of each window, per channel"

    def _int_entry(self, i, j, **kw):
        g = self.geometry
        b, oy, ox = self._pixel(i, g.OH, g.OW)
        return sum(self.operands[0]._entry(r, j, **kw) for r, _, _ in self._window(b, oy, ox)) / (g.kh * g.kw)


class AvgPoolGrad(ImageNode):
    """``spread(G)``: each window's ``G`` shared evenly by its ``kh·kw`` pixels (avg-pool's gradient)."""

    kernel, label = ir.AvgPoolGrad, "spread"
    notation = "spread(G): each window's G shared evenly by its pixels (avg-pool's gradient)"
    reads_image = False
    writes_image = True

    def _int_entry(self, i, j, **kw):
        g = self.geometry
        return sum((self.operands[0]._entry(r, j, **kw) for r, _, _ in self._covering(i)),
                   sp.Integer(0)) / (g.kh * g.kw)


class Reshape(Printable, Ops, MatrixExpr):
    """The same row-major memory read as ``(rows, cols)``: ``flatten`` and its adjoint.

    ``image`` is the ``(H, W, C)`` the result holds (empty: not an image).
    """

    precedence = PRECEDENCE["Atom"]
    notation = "flatten(A): images (n, H, W, C) as rows (n, H·W·C), row-major over (h, w, c); unflatten: back"

    def _entry(self, i, j, **kw):
        return _entry_of(self, i, j, **kw)

    def __new__(cls, x, rows, cols, image=()):
        return MatrixExpr.__new__(cls, x, sp.sympify(rows), sp.sympify(cols), sp.Tuple(*image))

    @property
    def shape(self):
        return (self.args[1], self.args[2])

    @property
    def out_image(self):
        return tuple(int(d) for d in self.args[3]) or None

    def _int_entry(self, i, j, **kw):
        x = self.args[0]
        cols = int(x.shape[1])
        flat = int(i) * int(self.shape[1]) + int(j)
        return x._entry(flat // cols, flat % cols, **kw)


# --------------------------------------------------------------------------- public builders


def conv2d(x, K, stride=1, padding="valid"):
    """The 2-D convolution (a correlation, as in every framework) of images ``x`` with kernel ``K``.

    ``x``: images ``(n, H, W, C)``; ``K``: ``sd.param(name, (kh, kw, c_in, c_out))``. ``stride``:
    an int or ``(sh, sw)``; ``padding``: ``"valid"``, ``"same"`` (Keras/TensorFlow), an int or
    ``(ph, pw)``. Returns images ``(n, OH, OW, c_out)``; add a bias ``c`` (``sd.param("c", c_out)``)
    with ``+``.
    """
    where = "conv2d"
    image = _require_image(x, where)
    dims = getattr(K, "value_shape", None)
    if not (isinstance(K, MatrixExpr) and dims is not None and len(dims) == 4):
        raise TypeError(f"{where}: the kernel must be sd.param(name, (kh, kw, c_in, c_out)), got "
                        f"{name_of(K) if isinstance(K, MatrixExpr) else repr(K)}")
    kh, kw, cin, cout = dims
    if cin != image[2]:
        raise ShapeMismatch(f"{where}: kernel {K.name} {tuple(dims)} expects {cin} input channels, but "
                            f"{name_of(x)} has {image[2]} (images {image[0]}x{image[1]}x{image[2]}); "
                            f"stride {stride!r}, padding {padding!r}")
    geo = conv_geometry(image, (kh, kw), stride, padding, f"{where} of {name_of(x)} (images {image}) with kernel "
                                                          f"{K.name} {tuple(dims)}")
    return MatMul(Patches(x, geo), K)


def _pool(cls, x, size, stride, where):
    image = _require_image(x, where)
    kh, kw = _pair(size, "size", where)
    stride = (kh, kw) if stride is None else stride
    geo = conv_geometry(image, (kh, kw), stride, "valid", f"{where} of {name_of(x)} (images {image})")
    return cls(x, geo)


def max_pool2d(x, size, stride=None):
    """The maximum over each ``size`` window (an int or ``(kh, kw)``); ``stride`` defaults to ``size``."""
    return _pool(MaxPool, x, size, stride, "max_pool2d")


def avg_pool2d(x, size, stride=None):
    """The mean over each ``size`` window (an int or ``(kh, kw)``); ``stride`` defaults to ``size``."""
    return _pool(AvgPool, x, size, stride, "avg_pool2d")


def flatten(x):
    """Images ``(n, H, W, C)`` as rows ``(n, H·W·C)``, row-major over ``(h, w, c)`` as Keras."""
    H, W, C = _require_image(x, "flatten")
    return Reshape(x, x.shape[0] / (H * W), H * W * C)


# --------------------------------------------------------------------------- gradients (autodiff.VJP)


@VJP.rule(Patches)
def _vjp_patches(node, G):
    return [(node.operands[0], PatchesAdjoint(G, node.geometry))]


@VJP.rule(PatchesAdjoint)
def _vjp_col2im(node, G):
    return [(node.operands[0], Patches(G, node.geometry))]


@VJP.rule(MaxPool)
def _vjp_maxpool(node, G):
    x = node.operands[0]
    return [(x, MaxPoolGrad(x, G, node.geometry))]


@VJP.rule(AvgPool)
def _vjp_avgpool(node, G):
    return [(node.operands[0], AvgPoolGrad(G, node.geometry))]


@VJP.rule(AvgPoolGrad)
def _vjp_avgpool_grad(node, G):
    return [(node.operands[0], AvgPool(G, node.geometry))]


@VJP.rule(Reshape)
def _vjp_reshape(node, G):
    x = node.args[0]
    return [(x, Reshape(G, *x.shape, image_shape(x) or ()))]


class PickMax(Printable, Ops, MatrixExpr):
    """``pick_max(A, V)``: each window's entry of ``V`` at the window's first arg-max of ``A``, per
    channel (the arg-max ``maxpool`` takes, ties as PyTorch): maxpool's directional derivative
    along ``V``, and the adjoint of ``route_max(A, ·)``. ``like`` is the pooled batch, whose shape
    the result has.

    It needs no kernel of its own: it lowers as its ``expansion`` into the other nodes. A patch
    matrix, whose rows ``(b, oy, ox)`` hold windows row-major over ``(dy, dx, c)``, is the same
    memory as an image ``(OH·OW·kh, kw, C)`` per batch entry whose ``kh x kw`` windows do not
    overlap, one per patch row; there ``route_max(·, 1)`` marks each window's first arg-max, and
    summing each window of ``mark ⊙ patches(V)`` picks ``V`` there.

    >>> import symdl as sd
    >>> x = sd.input("x", (4, 4, 1)); v = sd.input("v", (4, 4, 1))
    >>> pooled = sd.max_pool2d(x, 2)
    >>> pick = PickMax(x, v, pooled, pooled.geometry)
    >>> print(pick); print(pick.expansion)
    pick_max(x, v)
    4*(avgpool((route_max(unflatten(patches(x)), 1))⊙(unflatten(patches(v)))))
    """

    precedence = PRECEDENCE["Atom"]
    notation = ("pick_max(A, V): each window's V at the window's first arg-max of A (maxpool's derivative "
                "along V; the adjoint of route_max)")

    def __new__(cls, x, v, like, geometry):
        return MatrixExpr.__new__(cls, x, v, like, sp.Tuple(*Geometry(geometry)))

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.args[-1])

    @property
    def shape(self):
        return self.args[2].shape

    @property
    def expansion(self):
        """The same value from ``patches``, ``unflatten``, ``route_max`` and ``avgpool`` (class doc)."""
        x, v, like, g = *self.args[:3], self.geometry
        tall = g.OH * g.OW * g.kh  # the patch rows stacked: one kh x kw window each, no overlap
        windows = Geometry((tall, g.kw, g.C, g.kh, g.kw, g.kh, g.kw, 0, 0, g.OH * g.OW, 1))

        def as_windows(m):
            return Reshape(Patches(m, g), like.shape[0] * g.kh * g.kw, g.C, (tall, g.kw, g.C))

        marks = MaxPoolGrad(as_windows(x), make_map(sp.Integer(1), [like]), windows)
        return make_map(g.kh * g.kw * VARS[0], [AvgPool(hadamard(marks, as_windows(v)), windows)])


@VJP.rule(MaxPoolGrad)
def _vjp_route_max(node, G):
    x, H = node.operands  # the routing is piecewise constant in x: only H gets a gradient (a.e.)
    return [(H, PickMax(x, G, H, node.geometry))]


@VJP.rule(PickMax)
def _vjp_pick_max(node, G):
    x, v, _ = node.args[:3]  # piecewise constant in x, and like gives only the shape
    return [(v, MaxPoolGrad(x, G, node.geometry))]


LOWER.rule(PickMax)(lower_expansion)


@PRINT_RULES.rule(PickMax)
def _print_pick_max(node, printer, latex=False):
    inner = ", ".join(printer._print(a) for a in node.args[:2])
    return r"\operatorname{pick\_max}\left(%s\right)" % inner if latex else f"pick_max({inner})"


# --------------------------------------------------------------------------- tangents (autodiff.JVP)


JVP.rule(Patches, PatchesAdjoint, AvgPool, AvgPoolGrad, Reshape)(linear_in_first_operand)


@JVP.rule(MaxPool)
def _jvp_maxpool(node, tan):
    x = node.operands[0]
    return None if tan(x) is None else PickMax(x, tan(x), node, node.geometry)


@JVP.rule(MaxPoolGrad)
def _jvp_route_max(node, tan):
    x, H = node.operands  # piecewise constant in x: only H's tangent moves it (a.e.)
    return None if tan(H) is None else MaxPoolGrad(x, tan(H), node.geometry)


@JVP.rule(PickMax)
def _jvp_pick_max(node, tan):
    x, v, like = node.args[:3]  # linear in v, piecewise constant in x
    return None if tan(v) is None else PickMax(x, tan(v), like, node.geometry)


# --------------------------------------------------------------------------- lowering (lowering.LOWER)


@LOWER.rule(ImageNode)
def _lower_image(lw, node):
    ops = tuple(Operand(lw.buffer_of(a)) for a in node.operands)
    lw.emit(node.kernel(lw.name(node), ops, node.geometry), node.shape)


@LOWER.rule(Reshape)
def _lower_reshape(lw, node):
    lw.emit(ir.Reshape(lw.name(node), (Operand(lw.buffer_of(node.args[0])),)), node.shape)


# --------------------------------------------------------------------------- printing (graph.PRINT_RULES)


@PRINT_RULES.rule(ImageNode)
def _print_image(node, printer, latex=False):
    inner = ", ".join(printer._print(a) for a in node.operands)
    if latex:
        return r"\operatorname{%s}\left(%s\right)" % (node.label.replace("_", r"\_"), inner)
    return f"{node.label}({inner})"


@PRINT_RULES.rule(Reshape)
def _print_reshape(node, printer, latex=False):
    label = "unflatten" if node.out_image else "flatten"
    inner = printer._print(node.args[0])
    return r"\operatorname{%s}\left(%s\right)" % (label, inner) if latex else f"{label}({inner})"


__all__ = ["conv2d", "max_pool2d", "avg_pool2d", "flatten", "image_shape", "conv_geometry", "Patches",
           "PatchesAdjoint", "MaxPool", "MaxPoolGrad", "AvgPool", "AvgPoolGrad", "Reshape", "ImageNode",
           "PickMax"]
