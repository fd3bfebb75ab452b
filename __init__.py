"""safediff: SafeDiffusion-R1 (GRPO with a CLIP steering reward) as a Ray actor-learner service.

The repository root is this package: each top-level folder is one of its subpackages, installed as
`safediff.<folder>`. The layers, whose imports point one way (tests/test_layers.py checks it):

    safediff.common          core: config, records, seeds, sampling with log-probs, policy and trainable
                             state, GRPO math, the weight-update protocol, the checkpoint format, assets
    safediff.actors          roles (each imports only core): rollout
    safediff.reward_server                                    reward
    safediff.learner                                          GRPO update and the DeepSpeed engine
    safediff.redteam                                          attacks, and the attack actor of red-teaming
    safediff.runtime         the step recipe, the Ray controller, actor groups, the run store, Redis
    safediff.world           the CPU miniature world (models, judges, report)
    safediff.evaluation      `safediff eval`: prompt sets, scorers, reports
    safediff.cli             the command line
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("safediff")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
