"""The small fully connected heads of DAB-DETR."""
from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them and none after the last.

    The submodule list is named ``layers`` as in the original code, so checkpoint keys read
    ``<name>.layers.<i>.weight``.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x):
        """x: [..., input_dim] -> [..., output_dim]."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
