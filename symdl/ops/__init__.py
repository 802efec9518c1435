"""Stage 5, node families: each module holds a family's nodes and fills every rule table for them
(VJP, JVP, LOWER, printing), so adding a family is adding one module.

* ``conv``    convolution, pooling, flatten (images are rows: ``(n·h·w, c)``);
* ``concat``  concatenation along the columns, its split and padding;
* ``padding`` zero-padding of image batches (``ZeroPadding2D``) and its crop;
* ``embedding`` token sequences as rows ``(n·T, d)``: the lookup ``E[ids]`` and its scatter-add;
* ``attention`` products within each sequence (scores, mixes) and the causal mask.
"""
from . import attention, concat, conv, embedding, padding  # noqa: F401 - registers the families' rules
from . import recurrence  # noqa: F401,E402 - recurrent layers: one scan node per layer (its rules)
