"""The plugin's panels."""

from .balance_panel import BalancePanel

PANELS = [BalancePanel]
