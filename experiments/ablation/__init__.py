"""The paper's Table 3 (No / Local / Global / Random / PMPL enhancers, several seeds) on
Fashion-MNIST, as an experiment beside the library: ``python -m experiments.ablation`` from the
repository's root, or ``make ablation``. The runner is :mod:`.run`, its report :mod:`.report`;
results land in bench/results/ablation/."""
