"""Training a model: the paper's fine-tuning attack, with a stored mask's weights frozen or
rewound, and safety restored by transplanting a mask's weights (`wandacli finetune`)."""
