"""seed_claims: the three claims the project's notes make for CNNs, each measured per layer.

Question: the notes prefer CNNs for (1) translation invariance, from shared weights and
pooling, (2) hierarchical features, from local receptive fields (edges early, parts and
objects deeper), and (3) parameter sharing. Are they true of the four families, and where in
each network? The runs are the `families` experiment's (same presets, budgets, CPU overrides
and seeds, taken from experiments/families.py), evaluated with the per-layer measures
(MEASURES) on top of eval's default: invariance through the layers, linear probes per layer,
and the top patches of each layer's units. The parameter-sharing section reads the
weight_sharing experiment's results.

    python -m experiments.claims run seed_claims:small    # train, evaluate, report.md + claims.md
    python -m experiments.claims run seed_claims:fashion_mnist --output=runs/families_fashion_mnist
                                                          # reuse the families runs

`python -m experiments run seed_claims:VARIANT` trains and evaluates the same runs with eval's
default measures and writes the generic report only; `experiments.claims` adds the opt-in
measures to each run's eval.json (`--update`) and writes claims.md.
"""

from experiments import define, families

QUESTION = (
    "Are the notes' claims for CNNs (translation invariance, hierarchical features, parameter "
    "sharing) true of a plain ConvNet, a max-pooled ConvNet, All-CNN-C and ResNet-20, and "
    "where in each network: how invariant is each layer to shifts, how linearly decodable is "
    "the class from each layer, and what do the units of each layer respond to?"
)
# Beyond eval's default measures (layer_invariance is one of them; listed for runs evaluated
# before it was).
MEASURES = ("layer_invariance", "probes", "top_patches")


get_experiment = define(
    "seed_claims",
    QUESTION,
    families.PRESETS,
    budgets=families.BUDGETS,
    seeds=families.SEEDS,
    cpu_overrides=families.CPU_ALLCNN,
    variant_overrides=families.VARIANT_OVERRIDES,
)
