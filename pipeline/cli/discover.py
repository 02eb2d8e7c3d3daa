"""`agmae-discover`: compute an attention store (default action), merge shards, inspect a store.

A thin adapter over `agmae.discovery.discover`: every option is a field of `DiscoveryConfig` or of a method's
options dataclass, defined once there.
"""
import dataclasses
from pathlib import Path

import click

from agmae import discovery, store
from agmae.cli.errors import demo_data_at_the_door, user_errors
from agmae.discovery import inspect as store_inspect
from agmae.discovery.run import DiscoveryConfig, load_method
from agmae.options import click_option, click_options, compose, dataset_options


def method_click_options():
    """One click option per method option (defaulting to None, so that the options given can be told apart),
    its help prefixed by the methods that take it."""
    fields, takers = {}, {}
    for method, spec in discovery.METHODS.items():
        for definition in dataclasses.fields(spec.options):
            fields.setdefault(definition.name, definition)
            takers.setdefault(definition.name, []).append(method)
    return compose(*(click_option(name, definition, help_prefix=" / ".join(takers[name]) + ": ", unset_default=True)
                     for name, definition in fields.items()))


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click_options(DiscoveryConfig)
@method_click_options()
@click.pass_context
def main(ctx, **options):
    """Compute attention maps for every image of a folder into an attention store (HDF5).

    With no --data it runs on the built-in demo dataset. A killed run resumes where it stopped when re-run;
    SIGTERM or SIGUSR1 (a cluster's preemption notice) saves the batch in flight and exits with code 75, and the
    same command resumes. Subcommands: `merge` (join shard stores) and `inspect` (summary, overlay PNG).
    """
    if ctx.invoked_subcommand is not None:
        return
    method_options = {name: options.pop(name) for name in list(options)
                      if name not in DiscoveryConfig.__dataclass_fields__}
    given = {name: value for name, value in method_options.items() if value is not None}
    if options["method"] is None:
        raise click.UsageError("--method is required (tokencut, dino, gradcam or oracle)")
    stray = sorted(set(given) - set(discovery.method_options(options["method"])))
    if stray:
        raise click.UsageError(f"{', '.join('--' + n.replace('_', '-') for n in stray)} does not apply to "
                               f"--method {options['method']}")
    with user_errors():
        config = DiscoveryConfig(**options, method_options=given)
        # the backbone loads first, so that missing weights fail before the demo dataset is built (the oracle's
        # default masks are the dataset's own, so it needs the dataset first)
        method = None if config.method == "oracle" and config.data is None else load_method(config)
        if config.data is None:
            config = DiscoveryConfig(**{**options, "data": demo_data_at_the_door(None)}, method_options=given)
        discovery.discover(config, method)


@main.command()
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Merged store to write.")
def merge(shards, out):
    """Join finished shard stores SHARD... into one store OUT (checks they agree and cover every index once)."""
    with user_errors():
        store.merge(shards, out)
    click.echo(f"merged {len(shards)} shards -> {out}")


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a grid of maps overlaid on their images, spread evenly over the store (so over its "
                   "classes).")
@click.option("--count", type=click.IntRange(min=1), default=16, show_default=True, help="Maps in the --png grid.")
@dataset_options
def inspect(file, png, count, data, train_split):
    """Summarise an attention store: counts by status, histogram of map values, method options."""
    with user_errors():
        click.echo("\n".join(store_inspect.summary(file)))
        if png:
            store_inspect.overlay_png(file, png, count, data, train_split)
            click.echo(f"wrote {png}")


if __name__ == "__main__":
    main()
