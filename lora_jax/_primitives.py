"""What lora_jax knows about JAX's primitives, in one place.

Both walkers of a program, `split`'s trace (`_trace.py`) and `wrap`'s
interpreter (`_transform.py`), read jaxprs. Everything they rely on that is
internal to JAX lives here: the `jax.extend.core` types, the primitives a
weight can pass through or be consumed by, and the parameters each one
carries. A JAX release that renames a primitive or changes its parameters
then needs one edit here, and a layout the code does not recognise raises
`UnknownLayout`, which the walkers turn into a safe answer (a materialised
weight with a warning, or a target `split` refuses) rather than a wrong one.

Each primitive has one `Role`: what it does to a weight that flows into it.

==============  ================================================================
role            primitives
==============  ================================================================
``CAST``        ``convert_element_type``, ``copy``, ``reduce_precision``: the
                weight keeps its layout.
``TRANSPOSE``   ``transpose``: its axes are permuted.
``RESHAPE``     ``reshape``: axes are merged or split.
``SLICE``       ``slice``, ``dynamic_slice``: a stacked axis is cut.
``SQUEEZE``     ``squeeze``: a size-1 stacked axis is dropped.
``CALL``        ``jit``/``pjit``, ``closed_call``, ``custom_jvp_call``,
                ``custom_vjp_call``: a body the walkers enter.
``REMAT``       ``checkpoint`` (``remat2``): a body with a save policy.
``SCAN``        ``scan``: a body run once per slice of its ``xs``.
``WHILE``       ``while``: condition and body over a carry.
``COND``        ``cond``: one of several branches.
``CONTRACT``    ``dot_general``: matmul and einsum; the weight is consumed.
``CONV``        ``conv_general_dilated``: the weight is a kernel.
``GATHER``      ``gather``: rows of the weight are looked up (embeddings).
==============  ================================================================

A primitive missing from the table consumes the weight in a way LoRA cannot
factor.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.extend import core as jcore

__all__ = [
    "JAX_VERSION",
    "ClosedJaxpr",
    "DropVar",
    "Jaxpr",
    "JaxprEqn",
    "Literal",
    "ROLES",
    "Role",
    "UnknownLayout",
    "bind",
    "body",
    "names_with_role",
    "open_body",
    "Params",
    "param",
    "params",
    "role_of",
]

JAX_VERSION = jax.__version__

Jaxpr = jcore.Jaxpr
ClosedJaxpr = jcore.ClosedJaxpr
JaxprEqn = jcore.JaxprEqn
Literal = jcore.Literal
DropVar = jcore.DropVar


class Role(enum.Enum):
    """What a primitive does to a weight flowing into it (see the module docstring)."""

    CAST = "cast"
    TRANSPOSE = "transpose"
    RESHAPE = "reshape"
    SLICE = "slice"
    SQUEEZE = "squeeze"
    CALL = "call"
    REMAT = "remat"
    SCAN = "scan"
    WHILE = "while"
    COND = "cond"
    CONTRACT = "contract"
    CONV = "conv"
    GATHER = "gather"


ROLES: dict[str, Role] = {
    "convert_element_type": Role.CAST,
    "copy": Role.CAST,
    "copy_p": Role.CAST,
    "reduce_precision": Role.CAST,
    "transpose": Role.TRANSPOSE,
    "reshape": Role.RESHAPE,
    "slice": Role.SLICE,
    "dynamic_slice": Role.SLICE,
    "squeeze": Role.SQUEEZE,
    "jit": Role.CALL,
    "pjit": Role.CALL,
    "closed_call": Role.CALL,
    "core_call": Role.CALL,
    "custom_jvp_call": Role.CALL,
    "custom_vjp_call": Role.CALL,
    "remat2": Role.REMAT,
    "checkpoint": Role.REMAT,
    "scan": Role.SCAN,
    "while": Role.WHILE,
    "cond": Role.COND,
    "dot_general": Role.CONTRACT,
    "conv_general_dilated": Role.CONV,
    "gather": Role.GATHER,
}
"""Every primitive a weight may reach, by name, with its role."""


def role_of(eqn: JaxprEqn) -> Role | None:
    """The role of an equation's primitive, ``None`` if lora_jax does not know it."""
    return ROLES.get(eqn.primitive.name)


def names_with_role(role: Role) -> frozenset[str]:
    """The primitive names that have ``role``."""
    return frozenset(name for name, r in ROLES.items() if r is role)


class UnknownLayout(Exception):
    """A known primitive carries parameters this version of lora_jax does not understand."""

    def __init__(self, primitive: str, detail: str):
        self.primitive, self.detail = primitive, detail
        super().__init__(
            f"the primitive '{primitive}' with parameters lora_jax does not understand on JAX {JAX_VERSION} ({detail})"
        )


def param(eqn: JaxprEqn, name: str, default: Any = ...) -> Any:
    """The parameter ``name`` of an equation; `UnknownLayout` if it is missing.

    A missing parameter means JAX changed the primitive since this code was
    written, so no rule may guess what it means.
    """
    if name in eqn.params:
        return eqn.params[name]
    if default is not ...:
        return default
    raise UnknownLayout(eqn.primitive.name, f"no parameter {name!r}; it has {sorted(eqn.params)}")


class Params(Mapping):
    """An equation's parameters, read-only; a missing one raises `UnknownLayout`, not `KeyError`."""

    def __init__(self, eqn: JaxprEqn):
        self._eqn = eqn

    def __getitem__(self, name: str) -> Any:
        return param(self._eqn, name)

    def get(self, name: str, default: Any = None) -> Any:
        return self._eqn.params.get(name, default)

    def __iter__(self):
        return iter(self._eqn.params)

    def __len__(self) -> int:
        return len(self._eqn.params)


def params(eqn: JaxprEqn) -> Params:
    """`Params` of ``eqn``: ``params(eqn)["dimension_numbers"]``."""
    return Params(eqn)


def body(eqn: JaxprEqn) -> ClosedJaxpr | Jaxpr:
    """The body of a ``CALL``/``REMAT``/``SCAN`` equation (``jaxpr`` or ``call_jaxpr``)."""
    for key in ("jaxpr", "call_jaxpr"):
        if key in eqn.params:
            return eqn.params[key]
    raise UnknownLayout(eqn.primitive.name, f"no body under 'jaxpr' or 'call_jaxpr'; it has {sorted(eqn.params)}")


def open_body(closed: ClosedJaxpr | Jaxpr) -> tuple[Jaxpr, Sequence[Any]]:
    """``(jaxpr, consts)`` of a closed or open body."""
    if isinstance(closed, ClosedJaxpr):
        return closed.jaxpr, closed.consts
    return closed, ()


def bind(eqn: JaxprEqn, invals: Sequence[Any]) -> Any:
    """Runs one equation on concrete or traced values, as JAX itself would.

    Raises:
      RuntimeError: JAX refused to re-run the equation with its own
        parameters, which means its internals changed; the message names the
        primitive and the JAX version.
    """
    try:
        params = eqn.primitive.get_bind_params(eqn.params)
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise RuntimeError(
            f"lora_jax could not re-run the primitive '{eqn.primitive.name}' on JAX {JAX_VERSION}: its "
            f"parameters have a form this version of lora_jax does not know ({type(e).__name__}: {e}). "
            "Please report it with both versions."
        ) from e
    with eqn.ctx.manager:
        return eqn.primitive.bind(*invals, **params)
