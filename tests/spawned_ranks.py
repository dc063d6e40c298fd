"""What each process spawned by the `gloo_ranks` fixture (tests/conftest.py) runs. A module of its own: spawned
processes import the target by module name, and `conftest` is not one name when several conftest files load."""


def rank_entry(target, rank: int, world: int, rendezvous: str, out: str, init: bool, args: tuple) -> None:
    """One spawned rank of `gloo_ranks`: its result saved to `out`, or its traceback to `out`.error."""
    import traceback

    import torch

    try:
        torch.set_num_threads(1)
        if init:
            import torch.distributed as dist

            dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
            result = target(rank, *args)
            dist.destroy_process_group()
        else:
            result = target(rank, world, rendezvous, *args)
        torch.save(result, out)
    except BaseException:
        with open(out + ".error", "w") as f:
            f.write(traceback.format_exc())
        raise
