"""Dense transfer (Tables 5 and 6, appendix E.3): a plain ViT, with or without the SAR last block,
fine-tuned for detection and semantic segmentation through ViTDet's simple feature pyramid.

Modules: ``backbone`` (the ViT map and the simple feature pyramid), ``detection`` (torchvision
Mask R-CNN / Faster R-CNN on it), ``segmentation`` (a semantic FPN head and the pixel loss),
``metrics`` (COCO / VOC mAP, mIoU), ``datasets`` (VOC 2007 / 2012, COCO JSON, class-mask
folders; joint transforms), ``figures`` (predictions beside the ground truth), ``tasks``
(``sarvit detect`` and ``sarvit segment`` on the generic run).

Nothing here is imported by ``import sarvit``: the modules import torch and torchvision.
"""
