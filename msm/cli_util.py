"""Small pieces the stage CLIs share: --var parsing and the --db option."""

from __future__ import annotations

import click


def parse_vars(pairs: tuple[str, ...]) -> dict[str, str]:
    values = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"'{pair}' is not NAME=VALUE", param_hint="--var")
        values[name.strip()] = value
    return values


var_option = click.option(
    "--var", "variables", multiple=True, metavar="NAME=VALUE", help="Fill a declared placeholder (repeatable)."
)
db_option = click.option(
    "--db", type=click.Path(dir_okay=True), default=None,
    help="Warehouse file (default: $MSM_DB, else $MSM_HOME/msm.duckdb).",
)
