"""Action heads, apart from the trunks: one file per head family (flow.py: flow matching; tokens.py: action tokens)."""
