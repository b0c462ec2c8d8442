"""The losses at extreme but legitimate settings against their ordinary ones, forward+backward on the
CPU: where a kernel's small terms turn denormal (docs/design.md, "Numerics and inputs": the row
loops flush denormals) or its fixed exponential shift stops being exact, time can jump by 10-60 ×.

    python benchmarks/profile_extremes.py [--reps 3]

Each row: the median of `reps` calls after one warm-up, at the ordinary setting and the extreme one,
and their ratio (1 is the goal).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastssl
from benchmarks.harness import median_ms


def _leaf(*shape, gen, scale=1.0, unit=False):
    x = torch.randn(*shape, generator=gen)
    return ((F.normalize(x, dim=1) if unit else x) * scale).requires_grad_()


def cases(gen):
    """(name, ordinary setting, extreme setting, fn(setting) -> loss)."""
    q, k = _leaf(4096, 128, gen=gen), _leaf(4096, 128, gen=gen)
    x, y = _leaf(4096, 256, gen=gen), _leaf(4096, 256, gen=gen)
    queue, key = torch.randn(65536, 128, generator=gen), torch.randn(256, 128, generator=gen)
    qm = _leaf(256, 128, gen=gen)
    student, weight = _leaf(8 * 64, 256, gen=gen, unit=True), _leaf(65536, 256, gen=gen, unit=True)
    teacher = F.normalize(torch.randn(2 * 64, 256, generator=gen), dim=1)
    teacher_weight = F.normalize(torch.randn(65536, 256, generator=gen), dim=1)

    def dino(feature_norm):  # DINO's head normalises its features; randn-like features have norm ~16
        return fastssl.dino_loss(student * feature_norm, teacher * feature_norm, weight * 4, teacher_weight * 4)

    def siglip(scale):
        return fastssl.siglip_loss(x, y, scale=scale, bias=-scale)

    def dino_at(**kw):  # the prototype losses at unit features (weights x4), one setting changed
        return fastssl.dino_loss(student, teacher, weight * 4, teacher_weight * 4, **kw)

    z, prototypes = _leaf(8 * 256, 128, gen=gen, unit=True), _leaf(3000, 128, gen=gen, unit=True)
    k2 = _leaf(4096, 128, gen=gen)

    return [
        ("nt_xent B=4096 D=128, temperature", 0.1, 0.003, lambda t: fastssl.nt_xent(q, k, temperature=t)),
        ("info_nce M=4096 D=128, temperature", 0.1, 0.003, lambda t: fastssl.info_nce(q, k, temperature=t)),
        ("siglip M=4096 D=256, scale (bias = -scale)", 10.0, 100.0, siglip),
        ("mochi B=256 K=65536, temperature", 0.2, 0.01, lambda t: fastssl.mochi_loss(qm, key, queue, temperature=t)),
        ("dino B=64 2+6 crops K=65536, feature norm (weights x4)", 0.25, 16.0, dino),
        ("dino, student temperature", 0.1, 0.01, lambda t: dino_at(student_temperature=t)),
        ("dino, teacher temperature", 0.04, 0.005, lambda t: dino_at(teacher_temperature=t)),
        ("dino sinkhorn, teacher temperature", 0.04, 0.005,
         lambda t: dino_at(teacher_temperature=t, centering="sinkhorn")),
        ("swav B=256 8 crops K=3000, epsilon", 0.05, 0.005, lambda e: fastssl.swav_loss(z, prototypes, epsilon=e)),
        ("swav, temperature", 0.1, 0.005, lambda t: fastssl.swav_loss(z, prototypes, temperature=t)),
        ("uniformity N=4096 D=128, t", 2.0, 50.0, lambda t: fastssl.uniformity_loss(q, t=t)),
        ("dcl B=4096 D=128, temperature", 0.1, 0.003, lambda t: fastssl.dcl_loss(q, k2, temperature=t)),
        ("koleo N=4096, rows duplicated (0 no, 1 yes)", 0, 1,
         lambda dup: fastssl.koleo_loss(torch.cat([q[:2048], q[:2048]]) if dup else q)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"{'case':58} {'ordinary':>9} {'ms':>9} {'extreme':>9} {'ms':>9} {'ratio':>7}")
    for name, ordinary, extreme, fn in cases(gen):
        times = [median_ms(lambda v=v, fn=fn: fn(v).backward(), args.reps) for v in (ordinary, extreme)]
        print(f"{name:58} {ordinary:9g} {times[0]:9.1f} {extreme:9g} {times[1]:9.1f} {times[1] / times[0]:7.2f}")


if __name__ == "__main__":
    main()
