"""What the command lines in `launch/` share: one-line usage errors, and library errors told in flag terms.

    parser = Parser(description=__doc__)   # a bad flag: "error: ... (see --help)", exit status 2
    print(f"error: {user_message(e)}")     # OptionError("top_p", ...) -> "--top-p 0.0: must lie in (0, 1]"
"""

from __future__ import annotations

import argparse

# Library setting names whose flag is not the name in kebab case.
FLAGS = {"tokenizer_dir": "--tokenizer"}


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (exit 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def flag(option: str) -> str:
    """The command-line flag of a library setting: "max_new_tokens" -> "--max-new-tokens"."""
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def user_message(error: Exception) -> str:
    """The one-line message of a library error, with a bad setting named by its flag."""
    from atp_jax.infer.runner import OptionError  # here: the launchers that need no model import no jax

    return error.message_for(flag(error.option)) if isinstance(error, OptionError) else str(error)


def enable_compilation_cache(directory: str) -> None:
    """JAX's persistent compilation cache in `directory`: later runs reuse compiled programs."""
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
