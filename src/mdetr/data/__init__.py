"""Datasets and converters: MDETR's annotation format (:mod:`mdetr.data.modulated`), the synthetic shapes
set, and readers of the published formats of Flickr30k Entities (:mod:`mdetr.data.flickr`), RefCOCO/+/g
(:mod:`mdetr.data.refcoco`) and LVIS (:mod:`mdetr.data.lvis`), plus the pre-training combination
(:mod:`mdetr.data.combine`)."""
