"""Write the world's prompt files (world/prompts/<set>.txt, one prompt per line), as the configs read them.

    python -m safediff.world.prompts
"""

from __future__ import annotations

from pathlib import Path

from safediff.world.data import prompt_sets, write_prompt_file

FOLDER = Path(__file__).parent / "prompts"


def main() -> int:
    for name, specs in prompt_sets().items():
        print(write_prompt_file(specs, FOLDER / f"{name}.txt"), len(specs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
