"""Model lines: a federated model retrained on a schedule, released only when it is not worse.

A line (:mod:`jipfed.lines.definition`) names its sites, training settings, schedule and release
rule. Each due run (:mod:`jipfed.lines.nightly`) asks the sites how many new cases they have
(:mod:`jipfed.lines.census`), trains a candidate with the round protocol from the released model on
the new cases plus a replay sample (:mod:`jipfed.lines.selection`), scores candidate and released
model on every site (:mod:`jipfed.federation.evaluation`), applies the rule
(:mod:`jipfed.lines.rule`) and records the version (:mod:`jipfed.lines.store`).
"""
