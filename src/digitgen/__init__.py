"""digitgen: conditional digit generation on MNIST.

    import digitgen
    model = digitgen.load("models/cvae-16/seed0.pt")  # or "runs:/<run_id>", "models:/digitgen@champion"
    sevens = model.generate(7, n=16)  # 16 x 28 x 28, values in [0, 1]

See digitgen.serving for the whole interface.
"""

__all__ = ["load"]


def __getattr__(name: str):
    # `import digitgen` stays instant (the CLI starts from it); torch loads on first use of the API
    if name == "load":
        from digitgen.serving import load

        return load
    raise AttributeError(f"module 'digitgen' has no attribute {name!r}")
