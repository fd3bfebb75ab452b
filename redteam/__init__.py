"""The red team: attacks that try to get an erased concept back (a role: it imports only core).

    ringabell.py    Ring-A-Bell: a concept vector in the text encoder's space and a genetic token search
    unlearndiff.py  UnlearnDiff: k tokens before a prompt optimised against the target model's UNet
    inversion.py    concept inversion: one new token fitted against the target model on pictures of the concept
    actor.py        AttackActor: UnlearnDiff against the policy being trained (red-teaming in the loop)

`safediff attack` (evaluation/attacks) runs them against finished models and judges them; the attack actor runs in
a training job and fills its adversarial prompt source (runtime/redteam.py).
"""
