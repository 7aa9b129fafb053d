"""The human-preference arena: pairs of models' samples of one condition, votes on them, and rankings
(`ratings` pure math, `schedule` which pair next, `service` the rules, `app` the web page)."""
