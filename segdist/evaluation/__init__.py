"""Scoring predictions of a segmentation model, one job per module:

    results     EvalResult (the confusion matrices), Accumulator (sums them per sample),
                all_reduce_result (over DDP ranks), summarize / flat_metrics (scores, MLflow names)
    loop        evaluate_split: the model over one rank's share of a split (no collective);
                save_probabilities (the same, writing every sample for the CRF grid)
    sinks       what the loop hands every sample to: DenseCRF, saved probabilities,
                prediction PNGs, examples for pictures
    folders     score_folders: label PNGs in the official VOC / Cityscapes formats;
                write_prediction_png
    checkpoint  load_checkpoint, model_from_checkpoint, check_classes_match
    text        format_summary: the readable report

The command line is segdist.evaluate; MSF is segdist.msf, boundary statistics
segdist.boundary, the CRF segdist.crf, pictures segdist.visualize.
"""
