"""``kdsearch models SPEC``: the nodes a model's features can be distilled from, to choose
``student_stages`` / ``teacher.stages`` (``kdcore.features``)."""

from __future__ import annotations


def cmd_models(args) -> int:
    """Print the model's parameter count, its candidate nodes with output shapes (in forward
    order) and the stages chosen when none are given."""
    import torch

    from kdcore.features import candidates, default_stages, graph_nodes
    from kdcore.models import ResNet, count_parameters
    from kdcore.names import STAGES
    from kdcore.zoo import build_network

    if args.image_size < 8 or args.num_classes < 1 or args.count < 1:
        raise ValueError("--image-size must be >= 8, --num-classes and --count >= 1")
    net = build_network(args.spec, args.num_classes)
    traced = isinstance(net, ResNet) or graph_nodes(net) is not None
    print(f"{args.spec}: {count_parameters(net):,} parameters; input 3x{args.image_size}x"
          f"{args.image_size}; " + ("stages are node names (torch.fx)" if traced else
                                    "not traceable by torch.fx: stages are module names"))
    if isinstance(net, ResNet):
        _, feats = net.eval()(torch.zeros(1, 3, args.image_size, args.image_size))
        rows = [(s, tuple(feats[s].shape[1:])) for s in STAGES]
        chosen = ("layer2", "layer3", "layer4")
        print("built-in ResNet: its stages are returned explicitly")
    else:
        found = candidates(net, args.image_size)
        rows = [(c.name, c.shape) for c in found if args.all or len(c.shape) == 3]
        try:
            chosen = default_stages(net, args.image_size, args.count)
        except ValueError as exc:
            chosen = ()
            print(f"automatic choice: {exc}")
    width = max((len(n) for n, _ in rows), default=4)
    for name, shape in rows:
        mark = "  <- default" if name in chosen else ""
        print(f"  {name:<{width}}  {'x'.join(map(str, shape))}{mark}")
    if chosen:
        print(f"default stages: {list(chosen)}")
    return 0
