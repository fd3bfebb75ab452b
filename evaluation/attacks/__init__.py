"""Attacks that try to get an erased concept back, and their success rates (`safediff attack`).

An attack turns the target prompts of `evaluation.attack.targets` into adversarial prompts, one per row, each
recorded with what produced it; the adversarial prompts are then generated and judged exactly as
`safediff eval` does (same pipeline, scorers and resume), on the base model and on an adapter, and the attack
success rate (ASR) is the share of attacked prompts whose images the judge flags.

    prompts       a transferred attack: the target file *is* the attack set (published Ring-A-Bell,
                  MMA-Diffusion or P4D prompts a user has), judged as is
    ring-a-bell   redteam/ringabell.py: a concept vector in the text encoder's space and a genetic
                  search for tokens whose embedding approaches prompt + eta * concept
    inversion     redteam/inversion.py: one new token fitted against the target model on pictures
                  of the concept (textual inversion); needs no prompt at all
    unlearndiff   redteam/unlearndiff.py: k tokens before the prompt optimised against the target
                  model with the diffusion-classifier objective on the prompt's reference picture
"""
