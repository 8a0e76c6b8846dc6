"""Cluster network topologies built from k-port switches: endpoints, switches, links, cost.

Links count switch-to-switch cables (the Insights paper's Table 3 convention; endpoint cables equal the
endpoint count). With k = 64 the table reads: FT2 2,048 / 96 / 2,048; MPFT (8 planes) 16,384 / 768 / 16,384;
FT3 65,536 / 5,120 / 131,072; Slim Fly 32,928 / 1,568 / 32,928; Dragonfly 261,632 / 16,352 / 384,272.

Notes on the last two:
* Slim Fly (MMS graph): q = 4w + delta, network radix k' = (3q - delta)/2, p = ceil(k'/2) endpoints per switch,
  2q^2 switches; the largest q with k' + p <= k. For k = 64 that is q = 28, which the table uses although the
  MMS construction needs q to be a prime power (28 is not): we report ``constructible`` alongside.
* Dragonfly (balanced, a = 2p = 2h, k >= p + h + a - 1): the canonical maximum has a*h + 1 groups (k = 64:
  513 groups, 16,416 switches, 262,656 endpoints). The table's row is the same group shape with 511 groups,
  every global port used; pass ``groups=511`` to reproduce it.
Cost is switches x switch price + links x link price; the paper used the Slim Fly paper's length-dependent
cable model, so our defaults (a least-squares fit to Table 3: $66,600 per switch, $1,130 per link) reproduce its
cost column only to within about 5%.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

TOPOLOGIES = ("ft2", "mpft", "ft3", "slimfly", "dragonfly")
DEFAULT_SWITCH_PRICE = 66_600.0
DEFAULT_LINK_PRICE = 1_130.0


@dataclass(frozen=True)
class Topology:
    """Counts of one network and its price."""

    name: str
    endpoints: int
    switches: int
    links: int
    note: str = ""
    constructible: bool = True

    def cost(self, switch_price: float = DEFAULT_SWITCH_PRICE, link_price: float = DEFAULT_LINK_PRICE) -> float:
        """Switches and switch-to-switch links at the given unit prices."""
        return self.switches * switch_price + self.links * link_price

    def cost_per_endpoint(self, switch_price: float = DEFAULT_SWITCH_PRICE,
                          link_price: float = DEFAULT_LINK_PRICE) -> float:
        return self.cost(switch_price, link_price) / self.endpoints


def _check_ports(k: int) -> None:
    if k < 4 or k % 2:
        raise ValueError(f"switch ports k = {k} must be an even number >= 4")


def fat_tree2(k: int) -> Topology:
    """Two-layer (leaf/spine) fat tree: k leaves with k/2 endpoints each, k/2 spines."""
    _check_ports(k)
    return Topology("FT2", k * k // 2, k + k // 2, k * k // 2)


def multi_plane_fat_tree(k: int, planes: int = 8) -> Topology:
    """``planes`` independent FT2s; each endpoint (GPU+NIC pair) sits in one plane."""
    t = fat_tree2(k)
    return Topology("MPFT", planes * t.endpoints, planes * t.switches, planes * t.links, f"{planes} planes")


def fat_tree3(k: int) -> Topology:
    """Three-layer fat tree: k pods of k/2 edge + k/2 aggregation switches, (k/2)^2 core switches."""
    _check_ports(k)
    return Topology("FT3", k ** 3 // 4, 5 * k * k // 4, k ** 3 // 2)


def is_prime_power(n: int) -> bool:
    """True when n = p^m for a prime p, m >= 1."""
    if n < 2:
        return False
    p = next(d for d in range(2, n + 1) if n % d == 0)  # smallest prime factor
    while n % p == 0:
        n //= p
    return n == 1


def slim_fly(k: int) -> Topology:
    """Largest MMS Slim Fly whose network ports plus endpoint ports fit in k."""
    best = None
    for q in range(3, k):
        delta = (q % 4) if q % 4 != 3 else -1  # q = 4w + delta, delta in {-1, 0, 1}
        if delta not in (-1, 0, 1):
            continue
        kn = (3 * q - delta) // 2
        p = math.ceil(kn / 2)
        if kn + p <= k:
            best = (q, kn, p)
    if best is None:
        raise ValueError(f"no Slim Fly fits {k}-port switches")
    q, kn, p = best
    switches = 2 * q * q
    ok = is_prime_power(q)
    note = f"q={q}, k'={kn}, p={p}" + ("" if ok else " (q is not a prime power: no MMS graph)")
    return Topology("SlimFly", switches * p, switches, switches * kn // 2, note, ok)


def dragonfly(k: int, groups: int | None = None) -> Topology:
    """Balanced Dragonfly (a = 2p = 2h); ``groups`` defaults to the canonical maximum a*h + 1."""
    _check_ports(k)
    p = (k + 1) // 4
    a, h = 2 * p, p
    g_max = a * h + 1
    g = g_max if groups is None else groups
    if not 2 <= g <= g_max:
        raise ValueError(f"dragonfly groups = {g} must be between 2 and a*h+1 = {g_max} for {k}-port switches")
    switches = g * a
    local = g * a * (a - 1) // 2
    # Every switch uses its h global ports when g < a*h + 1 (some group pairs get a second link).
    global_links = switches * h // 2
    return Topology("Dragonfly", switches * p, switches, local + global_links, f"p={p}, a={a}, h={h}, g={g}")


def all_topologies(k: int, planes: int = 8, dragonfly_groups: int | None = None) -> list[Topology]:
    """The Insights paper's Table 3 columns for k-port switches."""
    return [fat_tree2(k), multi_plane_fat_tree(k, planes), fat_tree3(k), slim_fly(k), dragonfly(k, dragonfly_groups)]
