"""Thin Hydra apps over actcomp: memory, speed, fit, train, table, figures, reproduce."""
import warnings

# Our conf/hydra/launcher/*.yaml share their names with the launcher plugins' schemas, which type-checks them;
# Hydra's deprecation notice about that match is noise on every run.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema")
