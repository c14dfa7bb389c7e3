"""The optimizers: one shell that composes a projector with an update rule.

For a stack of k same-shape parameters W in a *subspace group* (a param group with the key
``rank``; a lone parameter is a stack of one), one step is::

    G  = the gradients as k x m x n, in proj_dtype   (tensors of more dims: rows x the rest)
    projector.refresh(G)                       (SVD / random refresh, or PCA init at step 0)
    R  = project(G)                            (k x r x n, k x m x r or k x r x r; osd.projectors)
    D  = rule(R, state, lr)                    (Adam / Lion / Adafactor in the subspace, fp32)
    W <- W (1 - lr wd) - scale * project_back(D)
    projector.after_update(G)                  (online PCA: one step on P; what it needs of G
                                                is taken before, when G's buffer takes the update)

Every line is a handful of batched ops whatever k is (see :mod:`osd.engine`), and none reads
a tensor on the host, but an SVD or random refresh.

A *plain group* (no ``rank``) runs the same rule in full space with no projection: plain
``osd.AdamW`` is ``torch.optim.AdamW`` (torch's fused kernel), ``osd.Lion`` the Lion paper's
update and ``osd.Adafactor`` ``transformers`` Adafactor with a fixed lr.

Weight decay is decoupled and applied to W in full space BEFORE the update, as
``torch.optim.AdamW`` does. GaLore and the OSD reference apply it after; the difference
per step is ``lr^2 * wd * update``, far below training noise.

Adam's eps: plain groups add it after bias correction (torch.optim.AdamW), subspace groups
before (GaLore and the OSD reference); see :class:`osd.rules.Adam`.

State dtypes: subspace moments are fp32, bases fp32 unless the group's ``basis_dtype`` is
bfloat16 (the projection matmuls run in the
group's ``proj_dtype``, by default the gradient's); plain-group moments take the
parameter's dtype, as in torch.optim.AdamW; 8-bit storage (``AdamW8bit``) keeps moments as
uint8 codes + fp32 block scales. ``step`` is a Python int. ``state_dict()`` holds tensors and
Python scalars only and loads with ``torch.load(weights_only=True)``.

When NOT to use a subspace group: for vectors, embeddings and the output head (use
:func:`osd.param_groups`, which leaves them plain), and for small models where optimizer
state is not the memory bottleneck: full-rank AdamW trains better per step.
"""

from __future__ import annotations

import inspect
import warnings

import torch

from osd import corrections, engine, hf, projectors, rules, shards, storage
from osd.rules import SGD as SGDRule
from osd.rules import Adafactor as AdafactorRule
from osd.rules import Adam, Rule
from osd.rules import Lion as LionRule
from osd.storage import EIGHT_BIT, FP32


class SubspaceOptimizer(torch.optim.Optimizer):
    """Base class: subclasses say which rule a group uses (:meth:`rule`) and which storage
    holds state (``storage``).

    ``step()`` groups the parameters that have a gradient into stacks (same group, shape,
    dtype, device and step count; see :mod:`osd.engine`) and calls :meth:`update` on each.
    :meth:`update` and its parts :meth:`refresh`, :meth:`project` and :meth:`finish` are the
    public entry points for callers that drive the steps themselves (:class:`osd.Layerwise`
    updates one parameter at a time, in backward, as a stack of one).

    Subspace options (``rank``, ``projector``, ``update_gap``, ...) are param-group keys
    (:func:`osd.param_groups`); given to a constructor as keyword arguments they raise a
    TypeError that says how to build the groups. A ``transformers.Trainer`` that builds the
    optimizer from ``optimizer_cls_and_kwargs`` passes only its own weight-decay groups of
    bare tensors, so the result has no subspace group: that warns (it is a valid plain
    optimizer); build the optimizer and pass ``Trainer(optimizers=(optimizer, None))``."""

    storage = FP32

    def __new__(cls, *args, **kwargs):
        # subspace options given to the constructor (as Trainer's optimizer_cls_and_kwargs
        # would pass them) belong in a param group: say how, before __init__'s bare TypeError
        misplaced = {k: v for k, v in kwargs.items() if k in GROUP_OPTIONS}
        if misplaced:
            accepted = inspect.signature(cls.__init__).parameters
            misplaced = {k: v for k, v in misplaced.items() if k not in accepted}
        if misplaced:
            raise TypeError(_misplaced_message(_public_name(cls), misplaced))
        return super().__new__(cls)

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        if not any("rank" in g for g in self.param_groups):
            trainer = hf.calling_trainer()
            if trainer is not None and getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
                warnings.warn(_plain_under_trainer_message(_public_name(type(self))), stacklevel=3)

    def rule(self, group: dict) -> Rule:
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # lr_0 of the online-PCA rule proj_lr = (1/T) * lr_t / lr_0; torch's schedulers use
        # the same key (and setdefault it the same way).
        group.setdefault("initial_lr", group["lr"])
        limit = group.get("max_stack_bytes")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
            raise ValueError(f"max_stack_bytes must be a positive integer or None, got {limit!r}")
        if "rank" in group:
            names = group.get("param_names") or [
                f"#{i} (shape {tuple(p.shape)})" for i, p in enumerate(group["params"])
            ]
            projectors.check_group(group, names)
        self._groups_of = None

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every parameter with a gradient: all or nothing (what can be refused,
        a non-finite gradient where a first basis must be built from it, is checked before
        any parameter changes)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rules.forget_step_tensors()
        stacks = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            stacks += self.stacks(params)
        first = [s for s in stacks if self._first_basis_from_gradient(s)]
        if first:  # the first step of a subspace group only: one host read
            flags = []
            for s in first:
                shard = shards.layout(s)
                flags.append(shard.all_true(torch.stack([torch.isfinite(shards.local(p.grad)).all() for p in s])))
            self._check_finite([p for s in first for p in s], flags)
        for stack in stacks:
            self.update(stack, [p.grad for p in stack])
        return loss

    def _first_basis_from_gradient(self, stack) -> bool:
        group = self.param_groups[self._positions()[0].get(stack[0], 0)]
        return (
            "rank" in group and self.state[stack[0]].get("step", 0) == 0 and projectors.from_group(group).from_gradient
        )

    def _check_finite(self, params, finite: list[torch.Tensor]) -> None:
        """Raise ValueError naming the parameters whose flag in ``finite`` is False."""
        flags = torch.cat([f.reshape(-1) for f in finite])
        if flags.device.type == "meta" or bool(flags.all()):
            return
        names = self._names()
        bad = [
            names.get(p, f"#{i} (shape {tuple(p.shape)})")
            for i, (p, ok) in enumerate(zip(params, flags.tolist(), strict=True))
            if not ok
        ]
        raise ValueError(
            f"non-finite gradient in {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} at the first step: "
            "the first basis is built from it (an SVD); nothing was updated"
        )

    def _names(self) -> dict:
        return {p: n for g in self.param_groups for p, n in zip(g["params"], g.get("param_names") or [], strict=False)}

    # -- stacks -------------------------------------------------------------------------

    def stacks(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """``params`` (of one or several groups) in the stacks a step batches: same group,
        matrix shape, dtype, device and step count, each at most ``max_stack_bytes`` of
        fp32 gradient. Plain AdamW groups with full-precision state form one stack per device and
        dtype (torch's fused kernel takes lists of any shapes)."""
        buckets: dict[tuple, list] = {}
        fused: dict[tuple, bool] = {}  # (group, dtype) -> runs torch's fused AdamW
        group_of = self._positions()[0]
        for p in params:
            gi = group_of.get(p)
            if gi is None:
                gi = self._group_index(p)  # raises for a parameter of another optimizer
            group = self.param_groups[gi]
            if (gi, p.dtype) not in fused:
                fused[gi, p.dtype] = self._fused_plain(group, p.dtype)
            if fused[gi, p.dtype]:
                shape = None
            else:
                shape = _matrix_shape(p) if "rank" in group else tuple(p.shape)
            key = (gi, shape, p.dtype, p.device, self.state[p].get("step", 0))
            buckets.setdefault(key, []).append(p)
        out = []
        for (gi, shape, _, _, _), members in buckets.items():
            if shape is None:
                out.append(members)
                continue
            limit = self.param_groups[gi].get("max_stack_bytes") or engine.MAX_STACK_BYTES
            out.extend(engine.split(members, torch.Size(shape).numel() * 4, limit))
        return out

    def _positions(self, rebuild: bool = False) -> tuple[dict, dict]:
        """(parameter -> group index, parameter -> position over all groups), rebuilt when
        the groups change."""
        key = tuple((id(g), len(g["params"])) for g in self.param_groups)
        if rebuild or getattr(self, "_groups_of", None) is None or self._groups_of[0] != key:
            ordered = [(i, q) for i, g in enumerate(self.param_groups) for q in g["params"]]
            group_of = {q: i for i, q in ordered}
            position = {q: n for n, (_, q) in enumerate(ordered)}
            self._groups_of = (key, group_of, position)
        return self._groups_of[1], self._groups_of[2]

    def _group_index(self, p) -> int:
        group_of = self._positions()[0]
        if p not in group_of:
            group_of = self._positions(rebuild=True)[0]  # a group's param list was edited in place
            if p not in group_of:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} is not in this optimizer")
        return group_of[p]

    def _seeds(self, params) -> list[int]:
        """Each parameter's 1-based position over all groups (the random projector's seed)."""
        position = self._positions()[1]
        return [position[p] + 1 for p in params]

    def _stack_group(self, params) -> dict:
        groups = {self._group_index(p) for p in params}
        if len(groups) != 1:
            raise ValueError(f"a stack takes parameters of one param group, got groups {sorted(groups)}")
        group = self.param_groups[groups.pop()]
        steps = {self.state[p].get("step", 0) for p in params}
        fused = self._fused_plain(group, params[0].dtype)  # torch's fused kernel takes any shapes
        shapes = {(None if fused else tuple(p.shape), p.dtype, p.device) for p in params}
        if len(steps) != 1 or len(shapes) != 1:
            raise ValueError(
                f"a stack takes parameters of one shape, dtype, device and step count, got {sorted(map(str, shapes))} "
                f"at steps {sorted(steps)}; use optimizer.stacks(params) to form stacks"
            )
        return group

    def _fused_plain(self, group, dtype) -> bool:
        """Plain AdamW with full-precision state runs torch's fused AdamW kernel (the same
        maths as torch.optim.AdamW)."""
        return (
            "rank" not in group
            and self.storage is FP32
            and dtype in rules.FUSED_DTYPES
            and isinstance(self.rule(group), Adam)
        )

    # -- the step of one stack: public entry points ----------------------------------------

    @torch.no_grad()
    def update(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """One optimizer step of a stack (see :meth:`stacks`) from its gradients."""
        group = self._stack_group(params)
        if "rank" not in group:
            self._plain_update(params, grads, group)
            return
        g = self.gradients(params, grads)
        self.refresh(params, g)
        r = self.project(params, g)
        # g is a copy unless it is a lone gradient of the projection dtype (a view of it)
        self.finish(params, r, g, r, scratch=len(grads) > 1 or g.dtype != grads[0].dtype)

    def gradients(self, params, grads) -> torch.Tensor:
        """A subspace stack's gradients as one ``k x m x n`` tensor in the projection dtype
        (``k x m_i x n``, this rank's rows, for FSDP2-sharded parameters)."""
        group = self._stack_group(params)
        grads = [shards.local(g) for g in grads]
        dtype = projectors.proj_dtype(group, grads[0].dtype)
        return engine.stack_grads(grads, _matrix_shape(grads[0]), dtype)

    @torch.no_grad()
    def refresh(self, params, g: torch.Tensor) -> None:
        """Start a step of a subspace stack: the projector (re)builds the bases from the
        gradients ``g`` (k x m x n) where its schedule says so (the only place a step may
        synchronise with the host: an SVD or a random draw)."""
        group = self._stack_group(params)
        projector = projectors.from_group(group)
        states = [self.state[p] for p in params]
        step = states[0].setdefault("step", 0)
        for s in states:
            s.setdefault("step", step)
        if not projector.refreshes(step):
            return
        shard = shards.layout(params)
        m, n = _matrix_shape(params[0])
        sides = projectors.resolve_sides(group["side"], m, n)
        rank = projectors.effective_rank(group["rank"], m, n, sides)
        st = engine.stack_state(states)
        finite = None  # the matrices that may take a new basis, when some may not
        if projector.from_gradient:
            flags = shard.all_true(torch.isfinite(g).flatten(1).all(1))
            # a refresh may synchronise: in the usual all-finite case nothing more is done
            if flags.device.type != "meta" and not bool(flags.all()):
                if step == 0:  # no basis to keep: refuse
                    self._check_finite(params, [flags])
                finite, g = flags, torch.where(flags.view(-1, 1, 1), g, 0)
        keep_old = step > 0 and (group["transport"] or finite is not None)
        old = {k: st[k].clone() for k in _bases(st)} if keep_old else {}
        projector.refresh(g, st, step, rank, sides, self._seeds(params), shard)
        engine.add_new_state(states, st)
        if finite is not None:  # a matrix with a non-finite gradient keeps its basis
            for k, before in old.items():
                torch.where(finite.view(-1, 1, 1), st[k], before, out=st[k])
            self._count_skips(~finite)
        if old and group["transport"]:
            projectors.transport(st, old, self.rule(group).moments, self.storage, shard)

    @torch.no_grad()
    def project(self, params, g: torch.Tensor) -> torch.Tensor:
        """The gradients ``g`` (k x m x n) projected with the stack's current bases."""
        bases = _bases(engine.stack_state([self.state[p] for p in params]))
        return projectors.project(g, bases, shards.layout(params))

    def finish(
        self,
        params,
        r: torch.Tensor,
        g: torch.Tensor,
        g_projected: torch.Tensor,
        micro_batches: int = 1,
        scratch: bool = False,
    ) -> None:
        """Finish a step of a subspace stack from the projected gradients ``r``: the rule,
        projection back, weight decay and apply, then the projector's own update, which sees
        the gradients ``g`` and their projection (the same as ``r`` unless accumulating: then
        ``g`` is the last of ``micro_batches`` micro-batches, and a full-rank correction
        takes ``micro_batches`` times its residual for the sum's).

        ``scratch``: ``g`` is the caller's to lose (a copy, or its last reference to a
        gradient): the m x n update, where one is made (a stack, or a correction), is made
        in its buffer, after the projector has taken what it needs from it."""
        # no_grad inside, not as a decorator: the decorator's wrapper would keep the
        # arguments alive until return, and r (a clipped copy) is freed before P's step
        with torch.no_grad():
            group = self._stack_group(params)
            rule, projector = self.rule(group), projectors.from_group(group)
            states = [self.state[p] for p in params]
            shard = shards.layout(params)
            params = [shards.local(p) for p in params]
            step = states[0]["step"]
            st = engine.stack_state(states)
            if step == 0:
                st.update(rule.init(r.shape, r.device, self.storage))
                engine.add_new_state(states, st)
            lr = group["lr"]
            bases = _bases(st)
            decay = lr * group.get("weight_decay", 0.0)
            scale = group["scale"]
            correction = group.get("correction", "none")
            layout = projectors.projected_layout(shard, bases)
            lone = len(params) == 1 and params[0].dtype == g.dtype  # updated in place, no m x n update
            reuse = scratch and (correction != "none" or not lone)  # the m x n update goes into g
            # W <- (1 - decay) W - scale U = lerp(W, -(scale / decay) U, decay): one pass over W,
            # and the factor goes on the small r x k update (into the rule's lr where the update
            # is lr times something the state does not depend on)
            folded = correction == "none" and decay and rule.scales_with_lr
            delta = self._subspace_rule(rule, r, st, lr * -scale / decay if folded else lr, step + 1, layout, g.dtype)
            if reuse:  # before g's buffer takes the update
                prepared = projector.prepare(g, g_projected, st, step, shard)
            if correction != "none":  # a full-space update (scale included): m x n anyway
                step_size = rule.step_size(lr, step + 1)
                alpha = -1 / decay if decay else 1.0
                update = corrections.update(
                    correction,
                    g,
                    g_projected,
                    r,
                    delta,
                    step_size,
                    bases,
                    scale,
                    st,
                    shard,
                    alpha,
                    micro_batches,
                    reuse,
                )
                engine.add_new_state(states, st)
                scale = 1.0
            else:
                if decay and not folded:  # the factor is in delta already when folded
                    delta = delta * (-scale / decay)
                delta = delta.to(g.dtype)
                update = None
                if lone:
                    # one matrix (osd.Layerwise): the last product adds into the weights in place
                    # (no m x n update); with decay, (1 - decay) W + decay U as the lerp below
                    alpha, beta = (decay, 1 - decay) if decay else (-scale, 1.0)
                    weight = params[0].view(1, *_matrix_shape(params[0]))
                    projectors.project_back_add(weight, delta, bases, alpha, beta)
                else:
                    update = projectors.project_back(delta, bases, out=g if reuse else None)
            if update is not None and decay:
                engine.lerp(params, update, decay)
            elif update is not None:
                engine.apply(params, update, lr, 0.0, alpha=-scale)
            del update, delta, r  # the m x n update and the fp32 copies: not alive in the basis step
            old = {k: b.clone() for k, b in bases.items()} if group["transport"] and step > 0 else {}
            if not reuse:
                prepared = projector.prepare(g, g_projected, st, step, shard)
            skipped = projector.after_update(prepared, st, step, lr / group["initial_lr"], shard)
            if skipped is not None:
                self._count_skips(skipped)
                if old:
                    projectors.transport(st, old, rule.moments, self.storage, shard)
            for s in states:
                s["step"] = step + 1

    def _subspace_rule(self, rule, r, st, lr, step, layout, dtype) -> torch.Tensor:
        """The rule's update of the projected gradients ``r`` (a stack), in fp32 maths. With
        8-bit state and an elementwise rule, more than ``engine.CHUNK_ELEMENTS`` values are
        updated a chunk of that many at a time (the same numbers as one pass): a chunk's fp32
        copy, dequantised moments and update are the only temporaries, and the whole update
        is kept in ``dtype`` (the gradients', which projecting it back casts to anyway)."""
        if not rule.elementwise:
            return self.storage.update(rule, r.float(), st, lr, step, layout)
        # the rule's moments only: a fused 8-bit kernel would requantise P's moments too
        names = {k for group in rule.moments for k in group}
        moments = {k: v for k, v in st.items() if k.split(".")[0] in names}
        n = r.numel()
        if self.storage is FP32 or n <= engine.CHUNK_ELEMENTS:
            return self.storage.update(rule, r.float(), moments, lr, step, layout)
        delta = torch.empty(r.shape, dtype=dtype, device=r.device)
        flat_delta = delta.view(1, -1)
        self._in_chunks(rule, r, moments, lr, step, lambda start, stop, u: flat_delta[:, start:stop].copy_(u))
        return delta

    def _in_chunks(self, rule, g, state, lr, step, use) -> None:
        """An elementwise rule's update of the values of ``g`` (``state`` stacked alike), a
        chunk of ``engine.CHUNK_ELEMENTS`` values at a time, each handed to ``use(start,
        stop, update)`` for the flat values ``[start, stop)`` and dropped before the next.
        The same numbers as one pass; no temporary is larger than a chunk's (8-bit storage
        computes in fp32 whatever ``g``'s dtype)."""
        flat, n = g.reshape(1, -1), g.numel()
        block = getattr(self.storage, "block_size", 1)
        for start in range(0, n, engine.CHUNK_ELEMENTS):
            stop = min(n, start + engine.CHUNK_ELEMENTS)
            sub = engine.chunk_state(state, start, stop, block)
            use(start, stop, self.storage.update(rule, flat[:, start:stop], sub, lr, step))

    def _chunked_update(self, p, grad, state, rule, group, step) -> None:
        """The plain update of one large tensor (an embedding, an output head) in chunks of
        ``engine.CHUNK_ELEMENTS`` values: elementwise rules give the same numbers as one
        pass, and no temporary (fp32 gradient, dequantised moments, update) is larger than
        a chunk. State stays one tensor (and one checkpoint entry) per moment."""
        dtype = p.dtype if self.storage is FP32 else torch.float32
        st = engine.stack_state([state])
        if step == 0:
            st.update(rule.init((1,) + tuple(p.shape), p.device, self.storage, dtype))
            engine.add_new_state([state], st)
        lr, weight_decay = group["lr"], group.get("weight_decay", 0.0)
        flat = p.view(-1)
        self._in_chunks(
            rule, grad, st, lr, step + 1, lambda start, stop, u: engine.apply([flat[start:stop]], u, lr, weight_decay)
        )

    def _count_skips(self, skipped: torch.Tensor) -> None:
        """Add a step's skipped basis updates ((k,) bool, on the device) to the counter."""
        counts = self.__dict__.setdefault("_skips", {})  # one counter per matrix of a stack size: one op
        key = (skipped.device, skipped.numel())
        if key not in counts:
            counts[key] = torch.zeros(skipped.numel(), dtype=torch.int64, device=skipped.device)
        counts[key].add_(skipped)

    def basis_updates_skipped(self) -> int:
        """How many matrix basis updates were skipped since this optimizer was built because
        the gradient was zero or not finite (online PCA's step on P, an SVD refresh): the
        basis stayed as it was. Reading it synchronises with the device."""
        return sum(int(c.sum().item()) for c in self.__dict__.get("_skips", {}).values() if c.device.type != "meta")

    def _plain_update(self, params, grads, group):
        rule = self.rule(group)
        states = [self.state[p] for p in params]
        shard = shards.layout(params)  # a shard is a tensor to the rules (Adafactor sums over ranks)
        params, grads = [shards.local(p) for p in params], [shards.local(g) for g in grads]
        step = states[0].setdefault("step", 0)
        lr, weight_decay = group["lr"], group.get("weight_decay", 0.0)
        if self._fused_plain(group, params[0].dtype):
            _fused_adamw(params, grads, states, group, step)
        elif (
            len(params) == 1
            and params[0].numel() > engine.CHUNK_ELEMENTS
            and isinstance(rule, Adam | LionRule | SGDRule)
        ):
            self._chunked_update(params[0], grads[0], states[0], rule, group, step)
        else:
            # 8-bit storage takes the gradients as they are and runs fp32 maths (fused)
            dtype = params[0].dtype if self.storage is FP32 else torch.float32
            g = engine.stack_grads(grads, tuple(params[0].shape), params[0].dtype)
            st = engine.stack_state(states)
            if step == 0:
                st.update(rule.init(g.shape, g.device, self.storage, dtype))
                engine.add_new_state(states, st)
            engine.apply(params, self.storage.update(rule, g, st, lr, step + 1, shard), lr, weight_decay)
        for s in states:
            s["step"] = step + 1

    # -- state ----------------------------------------------------------------------------

    def state_bytes(self, group: int | None = None) -> int:
        """Bytes of optimizer state (moments, bases, the bases' own optimizer state) held for
        all groups, or for ``param_groups[group]``."""
        groups = self.param_groups if group is None else [self.param_groups[group]]
        return sum(storage.nbytes(self.state.get(p, {})) for g in groups for p in g["params"])

    def state_dict(self):
        """torch's state dict; per-parameter state tensors are slices of stacked storage, so
        a slice whose storage is not wholly in this state dict is copied out (``torch.save``
        writes a view's whole storage): the file holds :meth:`state_bytes` of state."""
        sd = super().state_dict()
        covered: dict[int, int] = {}
        for param_state in sd["state"].values():
            for t in storage.tensors(param_state).values():
                key = t.untyped_storage().data_ptr()
                covered[key] = covered.get(key, 0) + t.nbytes
        for index, param_state in sd["state"].items():
            out = dict(param_state)
            for k, t in storage.tensors(param_state).items():
                whole = t.untyped_storage()
                if covered[whole.data_ptr()] != whole.nbytes() or t.device.type == "meta":
                    out[k] = t.clone()
            sd["state"][index] = out
        return sd

    def load_state_dict(self, state_dict):
        # torch casts every state tensor to its parameter's dtype on load, which would turn
        # fp32 subspace state of bf16 weights into bf16; load the groups through torch and
        # the state ourselves, moving tensors to the parameter's device only.
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        params = [p for g in self.param_groups for p in g["params"]]
        for index, param_state in state_dict["state"].items():
            p = params[int(index)]
            self.state[p] = storage.unpack(param_state, p.device)
        self._groups_of = None


def _fused_adamw(params, grads, states, group, step):
    """torch's fused AdamW kernel over a list of plain parameters (one device and dtype)."""
    if step == 0:
        for p, s in zip(params, states, strict=True):
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    beta1, beta2 = group["betas"]
    torch._fused_adamw_(
        params,
        grads,
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        [],
        [rules.step_tensor(step + 1, params[0].device)] * len(params),
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2,
        weight_decay=group.get("weight_decay", 0.0),
        eps=group["eps"],
        amsgrad=False,
        maximize=False,
    )


# group keys that only make sense in a param group (osd.param_groups' arguments)
GROUP_OPTIONS = ("rank", "target_modules", *projectors.SUBSPACE_DEFAULTS)

_HOW = (
    "Build the groups with osd.param_groups(model, {options}) and pass them to the optimizer: "
    "{name}(osd.param_groups(model, {options}), lr=...). With a Hugging Face Trainer, build the "
    "optimizer yourself and pass Trainer(..., optimizers=(optimizer, None)); "
    "Trainer(optimizer_cls_and_kwargs=...) hands the optimizer only its own weight-decay groups of "
    "bare tensors, from which no subspace group can be formed."
)


def _misplaced_message(name: str, options: dict) -> str:
    shown = ", ".join(f"{k}={v!r}" for k, v in sorted(options.items(), key=lambda kv: kv[0] != "rank"))
    if "rank" not in options:
        shown = "rank=..., " + shown
    return (
        f"{name}() got subspace option(s) {', '.join(options)} as keyword arguments; they are "
        "param-group options (a group with 'rank' is a subspace group). " + _HOW.format(name=name, options=shown)
    )


def _plain_under_trainer_message(name: str) -> str:
    return (
        f"transformers.Trainer built {name} from optimizer_cls_and_kwargs with its own weight-decay "
        "groups: no group has 'rank', so this is a plain full-rank optimizer with no subspace and no "
        "memory saving. If that is what you want, ignore this warning. For subspace training, "
        + _HOW.format(name=name, options="rank=...")
    )


def _public_name(cls) -> str:
    return f"osd.{cls.__name__}" if cls.__module__.startswith("osd.") else cls.__name__


def _bases(state):
    return {k: state[k] for k in (projectors.ROWS, projectors.COLS) if k in state}


def _matrix_shape(p) -> tuple[int, int]:
    """The m x n matrix the projectors see for a parameter (rows x the rest)."""
    return (p.shape[0], p.shape[1:].numel())


class AdamW(SubspaceOptimizer):
    """AdamW; subspace groups keep m and v in the rank-r subspace.

    State of an m x n matrix with rank r (fp32): full rank ``2mn``; subspace
    ``2 max(m,n) r`` moments + ``min(m,n) r`` basis (+ ``2 min(m,n) r`` for the online-PCA
    AdamW on the basis)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        _check_hparams(lr=lr, eps=eps, weight_decay=weight_decay, betas=betas)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def rule(self, group):
        # subspace groups follow GaLore / the OSD reference, plain groups torch.optim.AdamW
        return Adam(tuple(group["betas"]), group["eps"], eps_before_correction="rank" in group)


class AdamW8bit(AdamW):
    """:class:`AdamW` with both moments stored in 8 bits (torchao block-wise quantisation,
    block 256; tensors under 4096 elements stay fp32). Same maths, about 1/4 of the state."""

    storage = EIGHT_BIT


class Lion(SubspaceOptimizer):
    """Lion (Chen et al. 2023): ``W <- W - lr (sign(b1 m + (1-b1) g) + wd W)``; one moment."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        _check_hparams(lr=lr, weight_decay=weight_decay, betas=betas)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    def rule(self, group):
        return LionRule(tuple(group["betas"]))


class Adafactor(SubspaceOptimizer):
    """Adafactor with a fixed learning rate (``transformers`` Adafactor with
    ``relative_step=False, scale_parameter=False, warmup_init=False``): factored second
    moment, update clipping, optional first moment ``beta1``."""

    def __init__(
        self,
        params,
        lr=1e-3,
        beta1=None,
        decay_rate=-0.8,
        eps=(1e-30, 1e-3),
        clip_threshold=1.0,
        weight_decay=0.0,
    ):
        _check_hparams(lr=lr, weight_decay=weight_decay)
        defaults = dict(
            lr=lr,
            beta1=beta1,
            decay_rate=decay_rate,
            eps=tuple(eps),
            clip_threshold=clip_threshold,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)

    def rule(self, group):
        return AdafactorRule(group["beta1"], group["decay_rate"], tuple(group["eps"]), group["clip_threshold"])


class SGD(SubspaceOptimizer):
    """Plain SGD without momentum (a baseline; subspace groups project the gradient)."""

    def __init__(self, params, lr=1e-3, weight_decay=0.0):
        _check_hparams(lr=lr, weight_decay=weight_decay)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    def rule(self, group):
        return SGDRule()


def _check_hparams(lr, weight_decay, eps=0.0, betas=(0.0, 0.0)):
    if not lr >= 0:
        raise ValueError(f"invalid learning rate {lr!r}: must be >= 0")
    if not weight_decay >= 0:
        raise ValueError(f"invalid weight_decay {weight_decay!r}: must be >= 0")
    if not eps >= 0:
        raise ValueError(f"invalid eps {eps!r}: must be >= 0")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"invalid betas {betas!r}: two numbers in [0, 1)")
