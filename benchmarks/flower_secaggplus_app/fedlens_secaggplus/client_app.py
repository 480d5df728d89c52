"""ClientApp: return the site's fixed vector from ``fit``, under Flower's ``secaggplus_mod``.

The mod runs the client side of SecAgg+ (key generation, Shamir shares of the mask seed
and of the first secret key, masking, unmasking); ``fit`` is only called in the
masked-vector stage. A site whose node config says ``drop = true`` raises there: it has
already advertised keys and sent its shares, so the server must reconstruct its pairwise
masks, which is the dropout case SecAgg+ is built for.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import NDArrays, Scalar

from .vectors import WEIGHT, site_vector

__all__ = ["SiteDropoutError", "app"]


class SiteDropoutError(RuntimeError):
    """Raised by a site told to drop out after sharing its keys."""


class FixedVectorClient(NumPyClient):
    """Returns one fixed array of shape ``(dim,)``; no training."""

    def __init__(self, site: int, vector: NDArrays, drop: bool) -> None:
        self.site = site
        self.vector = vector
        self.drop = drop

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        if self.drop:
            raise SiteDropoutError(f"site {self.site} drops out before sending its masked vector")
        return self.vector, WEIGHT, {}


def client_fn(context: Context) -> Client:
    site = int(context.node_config["site-index"])
    drop = bool(context.node_config["drop"])
    dim = int(context.run_config["dim"])
    seed = int(context.run_config["seed"])
    return FixedVectorClient(site, [site_vector(seed, site, dim)], drop).to_client()


app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
