"""Building blocks shared by every model: dense and convolutional projections and learned
tables (``dense``), norms (``norms``), multi-head attention (``attention``) and MLPs
(``mlp``). Every parameter carries logical axis names (``metamorph.sharding``)."""
