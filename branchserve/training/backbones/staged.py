"""A backbone cut into stages at named modules, with an exit head after every cut.

The backbone's forward is traced with torch.fx, its top-level blocks kept whole (children, and the
children of Sequential/ModuleList containers, and every module named as a cut), and the trace is
cut after each named module: stage k runs from one cut to the next, and the last stage ends in the
backbone's own output, which is the final exit. A cut is only allowed where the network is a
chain, where nothing computed before the module is used after it but the module's output: a
connection over the cut (a residual that skips it, the input reused later) would leave a stage
that cannot run on its input alone, so it is refused with the names of what crosses it.

To the regime, the training loop and export the result is a `BranchedNet` whose blocks are the
stages: the stage graphs hold the backbone's own modules, so `blocks.k.<name>` is the backbone's
`<name>` and a trained backbone loads before the cut.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from branchserve.training.backbones.imported import BackboneError
from branchserve.training.config import ArchConfig
from branchserve.training.model import BranchedNet, ExitHead, count_macs


def block_names(module: nn.Module, prefix: str = "") -> list[str]:
    """Where an exit may go: the module's children, with Sequential and ModuleList containers
    replaced by their own children, recursively (layer1 → layer1.0, layer1.1)."""
    names = []
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential | nn.ModuleList):
            names += block_names(child, f"{prefix}{name}.")
        else:
            names.append(f"{prefix}{name}")
    return names


def trace(backbone: nn.Module, cuts: Iterable[str], what: str) -> fx.GraphModule:
    """The backbone's forward as a graph, each block (and each cut) one call_module node."""
    cuts = set(cuts)
    whole = {b for b in block_names(backbone) if not any(c.startswith(b + ".") for c in cuts)} | cuts

    class BlockTracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname in whole or super().is_leaf_module(m, qualname)

    try:
        graph = BlockTracer().trace(backbone)
    except Exception as e:  # whatever the user's forward raises under tracing
        raise BackboneError(
            f"{what}: torch.fx cannot trace its forward to cut it into stages ({type(e).__name__}: {e}); "
            "code that branches on tensor values must sit inside a module (each block is traced whole)"
        ) from None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise BackboneError(f"{what}: forward must take one tensor, it takes {len(placeholders)} arguments")
    return fx.GraphModule(backbone, graph)


def crossing(nodes: list[fx.Node], at: int) -> list[fx.Node]:
    """Values computed at or before position `at` that a later node uses (parameters excepted)."""
    later = {id(n) for n in nodes[at + 1 :]}
    return [n for n in nodes[: at + 1] if n.op != "get_attr" and any(id(u) in later for u in n.users)]


def _label(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "the input"
    return f"'{node.target}'" if node.op == "call_module" else f"'{node.name}'"


def cut_positions(traced: fx.GraphModule, cuts: Sequence[str], what: str) -> list[int]:
    """Positions of the cut modules' nodes in the graph, each checked to be a chain point."""
    nodes = list(traced.graph.nodes)
    positions = []
    for name in cuts:
        calls = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == name]
        if not calls:
            known = dict(traced.named_modules())
            why = "its forward never calls it" if name in known else "it has no module of that name"
            raise BackboneError(
                f"{what}: cannot put an exit after '{name}': {why}; blocks: {', '.join(block_names(traced))}"
            )
        if len(calls) > 1:
            raise BackboneError(
                f"{what}: '{name}' runs {len(calls)} times in a forward; an exit needs a module that runs once"
            )
        if positions and calls[0] < positions[-1]:
            raise BackboneError(
                f"{what}: '{name}' runs before '{cuts[len(positions) - 1]}'; name the exits in the order they run"
            )
        others = [n for n in crossing(nodes, calls[0]) if n is not nodes[calls[0]]]
        if others:
            raise BackboneError(
                f"{what}: the network is not a chain at '{name}': besides its output, "
                f"{', '.join(_label(n) for n in others)} computed before it "
                f"{'is' if len(others) == 1 else 'are'} used after it (a connection over the cut), so a stage "
                "starting there could not run on its input alone; put the exit after a module every path runs through"
            )
        positions.append(calls[0])
    return positions


def stage_modules(traced: fx.GraphModule, positions: list[int], what: str) -> list[fx.GraphModule]:
    """One graph per stage: from the previous cut's output (or the input) to its own cut (or the output)."""
    nodes = list(traced.graph.nodes)
    output = next(n for n in nodes if n.op == "output")
    if not isinstance(output.args[0], fx.Node):
        raise BackboneError(f"{what}: forward must return one tensor of logits, not {type(output.args[0]).__name__}")
    bounds = [0, *(p + 1 for p in positions), len(nodes) - 1]
    ends = [nodes[p] for p in positions] + [output.args[0]]
    owner: dict[str, int] = {}
    stages = []
    for k in range(len(ends)):
        graph, env = fx.Graph(), {}
        env[nodes[0] if k == 0 else nodes[positions[k - 1]]] = graph.placeholder("x")

        def arg(node: fx.Node, k: int = k, graph: fx.Graph = graph, env: dict = env) -> fx.Node:
            if node not in env and node.op == "get_attr":  # parameters are copied into the stage using them
                env[node] = graph.node_copy(node)
                _own(owner, str(node.target), k, what)
            return env[node]

        for node in nodes[bounds[k] : bounds[k + 1]]:
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            if node.op == "call_module":
                _own(owner, str(node.target), k, what)
            env[node] = graph.node_copy(node, arg)
        graph.output(env[ends[k]])
        stages.append(fx.GraphModule(traced, graph, class_name=f"Stage{k}"))
    return stages


def _own(owner: dict[str, int], target: str, stage: int, what: str) -> None:
    """Each module and parameter belongs to one stage, or training one stage would move another."""
    if owner.setdefault(target, stage) != stage:
        raise BackboneError(f"{what}: '{target}' is used in stage {owner[target]} and in stage {stage}: not a chain")


class _MacCounter(fx.Interpreter):
    """Runs the traced backbone on one input, noting the multiply-accumulates done up to each node."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.total, self.after, self.shapes = 0, {}, {}

    def call_module(self, target: str, args: tuple, kwargs: dict) -> object:  # type: ignore[override]
        if len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
            macs, out = count_macs(self.fetch_attr(target), args[0])
            self.total += macs
            return out
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        self.after[n], self.shapes[n] = self.total, tuple(out.shape) if isinstance(out, Tensor) else None
        return out


def equidistant_cuts(backbone: nn.Module, exits: int, x: Tensor, what: str) -> list[str]:
    """The `exits − 1` blocks whose cumulative MACs lie nearest k/exits of the backbone's, for
    k = 1 … exits − 1, among the blocks that are chain points with a feature-map output."""
    traced = trace(backbone, (), what)
    counter = _MacCounter(traced.eval())
    was_training = backbone.training
    with torch.no_grad():
        counter.run(x)  # traced holds the backbone's modules, so eval() there is eval() here
    backbone.train(was_training)
    nodes = list(traced.graph.nodes)
    total = counter.total
    candidates = [
        (i, counter.after[n])
        for i, n in enumerate(nodes)
        if n.op == "call_module" and crossing(nodes, i) == [n] and len(counter.shapes[n] or ()) == 4
        if 0 < counter.after[n] < total
    ]
    if len(candidates) < exits - 1:
        raise BackboneError(
            f"{what}: only {len(candidates)} blocks can carry an exit ({', '.join(str(nodes[i].target) for i, _ in candidates)}); "
            f"ask for at most {len(candidates) + 1} exits (--branches) or name them (--branch-after)"
        )
    chosen: list[int] = []
    for k in range(1, exits):
        left = [c for c in candidates if not chosen or c[0] > chosen[-1]][: len(candidates)]
        usable = left[: len(left) - (exits - 1 - k)]  # leave a block for every exit still to place
        chosen.append(min(usable, key=lambda c: abs(c[1] - total * k / exits))[0])
    return [str(nodes[i].target) for i in chosen]


class StagedNet(BranchedNet):
    """A backbone cut at `cuts`: `blocks[k]` is stage k, `heads[k]` an exit head for k < last and
    the identity for the last stage, whose output is the backbone's own logits."""

    def __init__(
        self,
        backbone: nn.Module,
        cuts: Sequence[str],
        input_shape: tuple[int, int, int],
        num_classes: int,
        what: str,
        head_conv_width: int = ArchConfig.head_conv_width,
        head_pool: int = ArchConfig.head_pool,
    ) -> None:
        nn.Module.__init__(self)  # the structure BranchedNet builds from an ArchConfig is made here from the cut
        traced = trace(backbone, cuts, what)
        stages = stage_modules(traced, cut_positions(traced, cuts, what), what)
        shapes = _boundary_shapes(stages, input_shape, num_classes, cuts, what)
        self.cuts, self.backbone_name = tuple(cuts), what
        self.stem = nn.Identity()
        self.blocks = nn.ModuleList(stages)
        self.heads = nn.ModuleList(
            [ExitHead(c, head_conv_width, min(head_pool, h, w), num_classes) for c, h, w in shapes[:-1]]
            + [nn.Identity()]
        )
        channels, size, _ = input_shape
        sizes = [size, *(s[1] if len(s) == 3 else 1 for s in shapes)]
        strides = [max(1, before // after) for before, after in itertools.pairwise(sizes)]
        self.arch = ArchConfig(
            in_channels=channels,
            image_size=size,
            num_classes=num_classes,
            stem_width=channels,
            blocks=tuple((s[0], stride) for s, stride in zip(shapes, strides, strict=True)),
            exits=tuple(range(len(stages))),
            head_conv_width=head_conv_width,
            head_pool=head_pool,
        )
        object.__setattr__(self, "backbone", backbone)  # not a submodule: its weights are the stages'

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """The backbone's weights under its own names (torchvision's, for resnet18)."""
        return self.backbone.state_dict()

    def exit_module(self, k: int) -> str | None:
        return self.cuts[k] if k < len(self.cuts) else None

    def features(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError("representation analysis takes the built-in backbone")


def _boundary_shapes(
    stages: list[fx.GraphModule], input_shape: tuple[int, int, int], num_classes: int, cuts: Sequence[str], what: str
) -> list[tuple[int, ...]]:
    """(C, H, W) after each cut and (classes,) at the end, from one zero input; checks both kinds."""
    x, shapes = torch.zeros(1, *input_shape), []
    modes = [m.training for m in stages]
    with torch.no_grad():
        for k, stage in enumerate(stages):
            x = stage.eval()(x)
            if not isinstance(x, Tensor):
                raise BackboneError(f"{what}: the output of '{cuts[k]}' is a {type(x).__name__}, not a tensor")
            shapes.append(tuple(x.shape[1:]))
    for stage, mode in zip(stages, modes, strict=True):
        stage.train(mode)
    for name, shape in zip(cuts, shapes, strict=False):
        if len(shape) != 3:
            raise BackboneError(
                f"{what}: an exit after '{name}' needs a feature map (N, C, H, W), it gives (N, {', '.join(map(str, shape))})"
            )
    if shapes[-1] != (num_classes,):
        raise BackboneError(
            f"{what}: its output is (N, {', '.join(map(str, shapes[-1]))}) but the data has {num_classes} classes: "
            "its classifier must have one output per class"
        )
    return shapes
