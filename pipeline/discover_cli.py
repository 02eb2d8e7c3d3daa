"""`agmae-discover` command line (placeholder until its stage lands)."""
import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Not implemented yet."""
    raise click.ClickException("agmae-discover is not implemented yet")
