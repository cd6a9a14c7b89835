"""Synthetic datasets with a known answer, offline (ClinicaDL's "generate"): trivial, atrophy, random and
shepplogan. Each writes OUTPUT/bids/participants.tsv (with age and sex, so splits work), OUTPUT/caps and
OUTPUT/generate.json with its parameters and seed; the same seed gives byte-identical files.

    python -m clinicadl_app.generate {trivial,atrophy,random} SOURCE_CAPS OUTPUT [options]
    python -m clinicadl_app.generate shepplogan OUTPUT [options]
"""

from clinicadl_app.generate.noise import Noise, generate_random
from clinicadl_app.generate.shepplogan import SheppLogan, generate_shepplogan
from clinicadl_app.generate.trivial import TRIVIAL_SPLIT, Trivial, generate_trivial, hemisphere

__all__ = ["TRIVIAL_SPLIT", "Noise", "SheppLogan", "Trivial", "generate_random", "generate_shepplogan",
           "generate_trivial", "hemisphere"]
