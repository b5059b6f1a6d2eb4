"""What LLPR (mace_ood.score.llpr) needs from a forward pass: the earlier readouts' per-atom
outputs, computed with the model's own readout modules on its own ``node_feats`` output."""

from __future__ import annotations

import torch


def llpr_unsupported(model: torch.nn.Module) -> str | None:
    """Why LLPR cannot be computed for ``model`` (its readouts are not MACE's standard ones), else None."""
    from mace.modules.blocks import LinearReadoutBlock, NonLinearReadoutBlock

    readouts = list(getattr(model, "readouts", []))
    if not readouts or type(readouts[-1]) is not NonLinearReadoutBlock:
        return f"its last readout is {type(readouts[-1]).__name__ if readouts else 'missing'}, not NonLinearReadoutBlock"
    if any(type(r) is not LinearReadoutBlock for r in readouts[:-1]):
        return "an earlier readout is not a LinearReadoutBlock"
    if len(readouts) != len(model.products):
        return "it has not one readout per interaction layer"
    from e3nn import o3

    last = o3.Irreps(str(model.products[-1].linear.irreps_out))
    if any(irrep.l != 0 or irrep.p != 1 for _, irrep in last):
        return "its last layer's features are not all invariant"
    return None


def layer_slices(model: torch.nn.Module) -> list[slice]:
    """Columns of each interaction layer in the model's ``node_feats`` output."""
    from e3nn import o3

    slices, offset = [], 0
    for product in model.products:
        width = o3.Irreps(str(product.linear.irreps_out)).dim
        slices.append(slice(offset, offset + width))
        offset += width
    return slices


def head_index(model: torch.nn.Module, head: str) -> int:
    heads = [str(h) for h in (getattr(model, "heads", None) or ["Default"])]
    return heads.index(head)


def earlier_readout_energies(model: torch.nn.Module, node_feats: torch.Tensor, head: int) -> torch.Tensor:
    """(n, L-1): each earlier layer's linear readout applied to that layer's part of the model's own
    ``node_feats`` output, for head ``head`` (unscaled, as the model sums them)."""
    slices = layer_slices(model)
    columns = [readout.linear(node_feats[:, part])[:, head] for readout, part in zip(model.readouts[:-1], slices, strict=False)]
    if not columns:
        return node_feats.new_zeros((node_feats.shape[0], 0))
    return torch.stack(columns, dim=1)


def hidden_width(model: torch.nn.Module) -> int:
    """Width of one head's block of the last, non-linear readout's hidden activation."""
    readout = model.readouts[-1]
    return int(readout.linear_2.irreps_in.dim) // int(getattr(readout, "num_heads", 1) or 1)


def llpr_features(model: torch.nn.Module, node_feats: torch.Tensor, head: int) -> torch.Tensor:
    """(n, D) per-atom LLPR features of head ``head``, differentiable: each earlier readout's output,
    then the last readout's hidden activation (its ``linear_1`` and non-linearity, the head's block):
    what :class:`mace_ood.score.llpr.ReadoutMap` computes from stored latents and layer energies."""
    readout = model.readouts[-1]
    width = hidden_width(model)
    hidden = readout.non_linearity(readout.linear_1(node_feats[:, layer_slices(model)[-1]]))
    return torch.cat([earlier_readout_energies(model, node_feats, head), hidden[:, head * width:(head + 1) * width]],
                     dim=1)


def llpr_force_jacobian(model: torch.nn.Module, node_feats: torch.Tensor, positions: torch.Tensor,
                        graph_of_atom: torch.Tensor, n_graphs: int, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (n, D) LLPR features (:func:`llpr_features`) and the (n, 3 D) Jacobian: for each atom, the gradient with respect to its position of each of its structure's
    summed LLPR features (the force's derivative by the last-layer weights, up to the sign and the
    model's scale), columns ordered (x, y, z) x feature. One backward pass per feature: the graphs of a
    batch are disjoint, so the gradient of a feature summed over all of them is, at each atom, its
    own structure's."""
    features = llpr_features(model, node_feats, head)
    sums = features.new_zeros((n_graphs, features.shape[1])).index_add_(0, graph_of_atom, features)
    total = sums.sum(dim=0)
    columns = [torch.autograd.grad(total[k], positions, retain_graph=True)[0] for k in range(len(total))]
    return features, torch.stack(columns, dim=-1).reshape(len(positions), -1)
