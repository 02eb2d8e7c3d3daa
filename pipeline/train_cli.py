"""`agmae-train` command line (placeholder until its stage lands)."""
import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Not implemented yet."""
    raise click.ClickException("agmae-train is not implemented yet")
