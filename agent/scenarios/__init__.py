"""Built-in evaluation scenarios made from real data shipped with scikit-learn.

``data`` loads the data sets and makes benign traffic; one module per attack
family builds that family's attack variants and measures its detector
(``evaluate(device, quick) -> dict``); ``agent.eval`` runs them all.
"""
