"""python -m clinicadl_app.generate KIND ...: the command line of the generators (see the package docstring)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clinicadl_app import generate
from clinicadl_app.core.errors import AppError
from clinicadl_app.layouts.caps import Caps


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clinicadl_app.generate", description=generate.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="kind", required=True)
    for kind, about in (("trivial", "a hemisphere darkened: left for AD, right for CN"),
                        ("atrophy", "the left hemisphere darkened by a random fraction (column 'atrophy')"),
                        ("random", "one real image plus Gaussian noise, random labels: networks stay at chance")):
        sub = kinds.add_parser(kind, help=about, description=about)
        sub.add_argument("source_caps", type=Path, help="a CAPS with t1-linear images (the participant level's)")
        sub.add_argument("output", type=Path)
        sub.add_argument("--n_subjects", "--n-subjects", type=int, default=40)
        sub.add_argument("--downsample", type=int, default=1, help="integer factor: 2 gives 2 mm images")
        sub.add_argument("--seed", type=int, default=0)
        if kind == "random":
            sub.add_argument("--sigma", type=float, default=0.5,
                             help="noise sd, as a fraction of the image's 99th intensity percentile")
            sub.add_argument("--prefix", default="RAND", help="participant labels are sub-<prefix><number>")
        else:
            sub.add_argument("--atrophy", type=float, default=0.6, help="fraction of intensity removed")
            sub.add_argument("--prefix", default="TRIV", help="participant labels are sub-<prefix><number>")
            sub.add_argument("--sessions", type=int, default=1,
                             help="above 1: each subject has 1 to this many sessions (follow-up scans)")
    sub = kinds.add_parser("shepplogan", help="2D Shepp-Logan phantoms, CN and AD subtypes")
    sub.add_argument("output", type=Path)
    sub.add_argument("--n_subjects", "--n-subjects", type=int, default=40, help="per class")
    sub.add_argument("--image_size", type=int, default=128)
    sub.add_argument("--cn_subtypes", type=float, nargs=3, default=(1.0, 0.0, 0.0), metavar=("S0", "S1", "S2"))
    sub.add_argument("--ad_subtypes", type=float, nargs=3, default=(0.05, 0.85, 0.10), metavar=("S0", "S1", "S2"))
    sub.add_argument("--no_smoothing", action="store_true")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--prefix", default="SHEP")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.kind == "shepplogan":
            table = generate.generate_shepplogan(args.output, generate.SheppLogan(
                args.n_subjects, args.image_size, tuple(args.cn_subtypes), tuple(args.ad_subtypes),
                not args.no_smoothing, args.seed, args.prefix))
        elif args.kind == "random":
            table = generate.generate_random(Caps(args.source_caps), args.output, generate.Noise(
                args.n_subjects, args.sigma, args.downsample, args.seed, args.prefix))
        else:
            table = generate.generate_trivial(Caps(args.source_caps), args.output, generate.Trivial(
                args.n_subjects, args.atrophy, args.downsample, args.seed, continuous=args.kind == "atrophy",
                prefix=args.prefix, sessions=args.sessions))
    except AppError as error:
        print(f"clinicadl-app generate: error: {error.message}", file=sys.stderr)
        return int(error.exit_code)
    print(f"{len(table)} subjects written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
